"""Faults end the job with one clear line, and a job spread over two torchrun agents (two "machines" on one box)
trains exactly as one agent does.

    non-finite loss      an absurd learning rate under pipeline parallelism: every stage stops at that step
    different settings   two agents, one given another --seed: stopped at start-up, the setting named on each
    stalled rank         SIGSTOP one rank: the others' collective times out after --timeout_s
    two agents           --nnodes 2 --nproc_per_node 2 == --nproc_per_node 4, loss for loss
"""
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import ROOT, TRAINING_LOOP, Run, concurrently, run_env, step_dir

# the parity runs of test_data_parallel: tp2 x dp2 in step 6 is the same command line there (its training loop
# included), so the launcher's cache runs the one-agent job once for both files
SMALL = ["--seq_len", 32, "--learning_rate", 1e-3, "--gradient_accumulation_steps", 2, "--max_tokens", 20 * 4 * 32,
         "--micro_batch_size", 1, *TRAINING_LOOP]
TWO_AGENT_LAYOUTS = {
    "tp2_dp2": ("step6", ["--tp_size", 2, "--dp_size", 2, "--bucket_size_mb", 1]),
    "pp2_dp2": ("step8", ["--pp_size", 2, "--dp_size", 2, "--pp_engine", "1f1b"]),
}
TIMEOUT_S = 5
TORCHRUN_GRACE_S = 30  # torchrun waits this long for a stopped worker to take SIGTERM, then kills it


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def two_agents(tmp_path, step, args_per_agent):
    """Run a job of 2 torchrun agents x 2 processes joined by a c10d rendezvous, as on two machines; returns one
    Run per agent (the metrics, written by the logging rank, are on whichever agent holds it)."""
    port, metrics = free_port(), tmp_path / f"metrics_{step}_{time.monotonic_ns()}.jsonl"
    procs = []
    for args in args_per_agent:
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2",
                   "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", f"job{port}",
                   str(step_dir(step) / "train.py"), *map(str, args), "--metrics_file", str(metrics)]
        procs.append(subprocess.Popen(command, cwd=ROOT, env=run_env(tmp_path), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outputs = [proc.communicate(timeout=300) for proc in procs]
    return [Run(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr), metrics)
            for proc, (stdout, stderr) in zip(procs, outputs)]


def stall_a_rank(tmp_path):
    """dp 2 in step 6; once step 2 is logged, SIGSTOP rank 1. -> (Run, seconds from the stop to the job's end)"""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(step_dir("step6") / "train.py"), "--dp_size", "2", "--seq_len", "32", "--micro_batch_size", "1",
               "--max_tokens", "1000000", "--timeout_s", str(TIMEOUT_S)]
    proc = subprocess.Popen(command, cwd=ROOT, env=run_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    stdout = ""
    for line in proc.stdout:
        stdout += line
        if line.startswith("Step: 2 "):
            break
    else:  # it never trained
        rest, stderr = proc.communicate()
        return Run(subprocess.CompletedProcess(command, proc.returncode, stdout + rest, stderr), None), None
    rank_1 = next(int(pid) for pid in os.listdir("/proc") if pid.isdigit() and worker_rank(int(pid), proc.pid) == 1)
    os.kill(rank_1, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        rest, stderr = proc.communicate(timeout=TIMEOUT_S + TORCHRUN_GRACE_S + 60)
    finally:
        if proc.poll() is None:
            os.kill(rank_1, signal.SIGKILL)
            proc.kill()
    seconds = time.monotonic() - stopped
    return Run(subprocess.CompletedProcess(command, proc.returncode, stdout + rest, stderr), None), seconds


def worker_rank(pid, agent_pid):
    """RANK of a worker process started by the torchrun agent agent_pid, else None."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            if int(stat.read().rsplit(")", 1)[1].split()[1]) != agent_pid:
                return None
        with open(f"/proc/{pid}/environ", "rb") as environ:
            variables = dict(entry.split(b"=", 1) for entry in environ.read().split(b"\0") if b"=" in entry)
        return int(variables[b"RANK"])
    except (OSError, KeyError, ValueError):
        return None


@pytest.fixture(scope="module")
def runs(torchrun, tmp_path_factory):
    """Every launch of this module: the stalled-rank run, which mostly waits (for the timeout, then for torchrun to
    kill the stopped process), beside the others two at a time."""
    tmp = tmp_path_factory.mktemp("faults")
    launches = {
        "stalled": lambda: stall_a_rank(tmp),
        "diverged": lambda: torchrun("step8", 2, "--pp_size", 2, "--seq_len", 32, "--learning_rate", 1e6,
                                     "--max_tokens", 100 * 8 * 32),
        # tp 4 over two agents of 2 processes: the tp group spans the "machines"
        "different_seed": lambda: two_agents(tmp, "step4", [["--tp_size", 4, *SMALL],
                                                            ["--tp_size", 4, *SMALL, "--seed", 7]]),
    }
    for name, (step, layout) in TWO_AGENT_LAYOUTS.items():
        launches[f"{name}_one_agent"] = lambda step=step, layout=layout: torchrun(step, 4, *SMALL, *layout)
        launches[f"{name}_two_agents"] = lambda step=step, layout=layout: two_agents(tmp, step, [[*SMALL, *layout]] * 2)
    return dict(zip(launches, concurrently(lambda launch: launch(), launches.values(), workers=3)))  # "stalled" first


def error_lines(*runs):
    return [line for run in runs for line in run.stderr.splitlines() if line.startswith("error: ")]


def test_a_non_finite_loss_stops_every_stage_at_that_step(runs):
    run = runs["diverged"]
    assert run.returncode != 0, run
    (line,) = error_lines(run)
    match = re.fullmatch(r"error: the loss is (nan|inf|-inf) at step (\d+): training diverged.*", line)
    assert match, line
    step = int(match.group(2))
    assert [m["step"] for m in run.metrics] == list(range(1, step)), run.metrics  # nothing logged after it
    assert all(m["loss"] == m["loss"] for m in run.metrics)  # the logged losses are numbers


def test_ranks_started_with_different_settings_stop_naming_them(runs):
    agents = runs["different_seed"]
    assert all(agent.returncode != 0 for agent in agents), agents
    first, second = (error_lines(agent) for agent in agents)  # one line on each machine: each agent shows its own
    assert len(first) == 1 and first == second, (first, second)
    (line,) = first
    assert "different settings" in line and "--seed" in line, line
    # Each machine says why before anything breaks: no connection error (a DistNetworkError with its C++ stack) in
    # an agent's output ahead of our line. A node whose ranks stop without saying it, or only after waiting, leaves
    # its agent polling the rendezvous store of the other agent, which has gone: that DistNetworkError comes first,
    # or alone. After the line it is torchrun's own exit, not ours: the agent hosting the store leaves as soon as
    # its ranks have stopped, and the other one, on a busy machine, may reach for the store a moment later.
    assert all("DistNetworkError" not in agent.stderr[:agent.stderr.index(line)] for agent in agents), agents
    assert re.search(r"42 on ranks \[\d, \d\]", line) and re.search(r"7 on ranks \[\d, \d\]", line), line
    assert "--learning_rate" not in line  # only what differs
    assert not any("Step: 1" in agent.stdout for agent in agents)


def test_a_tensor_parallel_group_across_nodes_gets_one_warning(runs):
    warnings = [line for agent in runs["different_seed"] for line in agent.stderr.splitlines()
                if line.startswith("warning: ")]
    assert warnings == ["warning: tensor-parallel groups of tp_size 4 ranks span nodes of 2 ranks: their all-reduces, "
                        "two per layer forward and two backward, cross the network between machines instead of the "
                        "links inside one; choose a tp_size that divides the processes per node"], warnings
    assert not any("warning: " in line for name, (_, layout) in TWO_AGENT_LAYOUTS.items()
                   for agent in runs[f"{name}_two_agents"] for line in agent.stderr.splitlines())


def test_a_stalled_rank_ends_the_job_after_the_timeout(runs):
    run, seconds = runs["stalled"]
    assert run.returncode != 0, run
    assert TIMEOUT_S <= seconds < TIMEOUT_S + TORCHRUN_GRACE_S + 15, seconds
    (line,) = error_lines(run)  # rank 0's; the stopped rank 1 says nothing
    assert line.startswith("error: [rank 0] a collective failed: a peer rank stalled for longer than --timeout_s"), line
    assert f"Timed out waiting {TIMEOUT_S * 1000}ms" in line, line


@pytest.mark.parametrize("layout", TWO_AGENT_LAYOUTS)
def test_two_agents_train_exactly_as_one(runs, layout):
    one = runs[f"{layout}_one_agent"]
    agents = runs[f"{layout}_two_agents"]
    assert one.returncode == 0, one
    assert all(agent.returncode == 0 for agent in agents), agents
    assert len(one.losses) == 20 and one.losses[-1] < one.losses[0] - 1.0, one.losses
    assert agents[0].losses == one.losses  # both agents share the metrics file that the logging rank wrote
    assert sum(agent.stdout.count("Step: 20 ") for agent in agents) == 1  # one logging rank in the job
