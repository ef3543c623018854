"""README "Debugging a distributed run": its commands do what it says, here.

- The hung 2-rank job (tools/distributed_mistakes.py skip_collective) is found stuck by the README's
  py-spy command, one rank at the all-reduce line and the other at the barrier line the README shows,
  and is then stopped with every process it started.
- TORCH_DISTRIBUTED_DEBUG=DETAIL turns the same hang into an immediate error naming both collectives.
- The other mistakes show the symptoms of the README's table, and --fixed removes the silent ones.
- torch.distributed.breakpoint stops one rank under torchrun on gloo while the other waits (driven
  through a pseudo-terminal, as a person at a terminal would).
"""
import os
import pty
import re
import select
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import ROOT, concurrently, run_env

TOOL = ROOT / "tools" / "distributed_mistakes.py"
README = (ROOT / "README.md").read_text()
SECTION = re.search(r"^## Debugging a distributed run\n(.*?)(?=^## )", README, flags=re.MULTILINE | re.DOTALL).group(1)
COMMANDS = [line.strip() for block in re.findall(r"```bash\n(.*?)```", SECTION, flags=re.DOTALL)
            for line in block.splitlines() if line.strip() and not line.startswith("#")]


def command(prefix):
    matches = [c for c in COMMANDS if c.startswith(prefix)]
    assert len(matches) == 1, (prefix, COMMANDS)
    return matches[0]


def env(tmp_path):
    environment = run_env(tmp_path)
    # torchrun and py-spy live next to this Python (a virtual environment's bin/)
    environment["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), environment.get("PATH", "")])
    return environment


def children(parent):
    """Processes whose parent is `parent`, from /proc/<pid>/stat: "pid (name) state ppid ..."."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == parent:
                    found.append(int(entry))
        except (OSError, IndexError, ValueError):
            continue
    return found


def stop(job, workers):
    """SIGTERM to torchrun, which stops its workers (they run in sessions of their own, so a process-group
    kill would miss them); SIGKILL whatever is left."""
    if job.poll() is None:
        job.send_signal(signal.SIGTERM)
        try:
            job.wait(timeout=30)
        except subprocess.TimeoutExpired:
            job.kill()
            job.wait(timeout=10)
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def run_bounded(line, tmp_path, timeout=120):
    """Run one README command line (through bash, as typed); on a timeout stop torchrun and its workers."""
    job = subprocess.Popen(["bash", "-c", line], cwd=ROOT, env=env(tmp_path), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        workers = [w for c in children(job.pid) for w in [c, *children(c)]]
        stop(job, workers)
        pytest.fail(f"{line!r} ran past {timeout} s")
    return job.returncode, output


def line_of(function, marker):
    """Line number of `marker` inside `function` of the tool."""
    source = TOOL.read_text().splitlines()
    start = next(i for i, text in enumerate(source) if text.startswith(f"def {function}("))
    return next(i + 1 for i in range(start, len(source)) if marker in source[i])


def test_the_documented_stack_dump_finds_the_hung_ranks_at_the_lines_the_readme_shows(tmp_path):
    hang = command("torchrun --nproc_per_node 2 tools/distributed_mistakes.py skip_collective")
    dump = command("py-spy dump")
    all_reduce_line = line_of("skip_collective", "dist.all_reduce(loss)  # MISTAKE")
    barrier_line = line_of("skip_collective", "dist.barrier()")
    shown = {int(n) for n in re.findall(r"skip_collective \(distributed_mistakes\.py:(\d+)\)", SECTION)}
    assert shown == {all_reduce_line, barrier_line}, "the README's sample output shows other lines than the tool's"

    job = subprocess.Popen(shlex.split(hang), cwd=ROOT, env=env(tmp_path), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    output, workers = [], []
    reader = threading.Thread(target=lambda: output.extend(job.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.time() + 120
        while sum("before the loss all-reduce" in line for line in output) < 2:
            assert job.poll() is None and time.time() < deadline, "".join(output)[-3000:]
            time.sleep(0.2)
        workers = children(job.pid)
        assert len(workers) == 2, workers
        for _ in range(20):  # a rank may still be between its print and its collective
            time.sleep(0.5)
            proc = subprocess.run(["bash", "-c", dump], cwd=ROOT, env=env(tmp_path), capture_output=True, text=True,
                                  timeout=60)
            stuck = {int(n) for n in re.findall(r"skip_collective \(\S*distributed_mistakes\.py:(\d+)\)", proc.stdout)}
            if stuck == shown:
                break
        if proc.returncode != 0 and re.search(r"[Pp]ermission denied|not permitted|ptrace", proc.stdout + proc.stderr):
            pytest.skip(f"py-spy may not read other processes here (ptrace restricted): {proc.stderr.strip()[:300]}")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert stuck == {all_reduce_line, barrier_line}, proc.stdout
        for pid in workers:  # both ranks are in the dump, each at its own line
            block = proc.stdout.split(f"Process {pid}:", 1)[1].split("\nProcess ", 1)[0]
            assert len(re.findall(r"skip_collective \(", block)) == 1, block
        assert job.poll() is None, "the job should still hang"
    finally:
        stop(job, workers)
    assert not [pid for pid in workers if alive(pid)], "a rank outlived the job"


def test_detail_debug_mode_turns_the_hang_into_an_error_naming_both_collectives(tmp_path):
    returncode, output = run_bounded(command("TORCH_DISTRIBUTED_DEBUG=DETAIL torchrun"), tmp_path)
    assert returncode != 0, output[-3000:]
    assert "Detected mismatch between collectives on ranks" in output, output[-3000:]
    assert "OpType=ALLREDUCE" in output and "OpType=BARRIER" in output, output[-3000:]
    assert "after the barrier" not in output


def mistake(name, fixed, tmp_path):
    line = f"torchrun --nproc_per_node 2 tools/distributed_mistakes.py {name}" + (" --fixed" if fixed else "")
    assert f"tools/distributed_mistakes.py {name}" in TOOL.read_text() and f"(`{name}`)" in SECTION, name
    return run_bounded(line, tmp_path)


@pytest.fixture(scope="module")
def mistakes(tmp_path_factory):
    """Each remaining mistake, and the two silent ones --fixed, two launches at a time."""
    cases = [("mismatched_shapes", False), ("last_micro_batch_sync", False), ("last_micro_batch_sync", True),
             ("seed_per_rank", False), ("seed_per_rank", True)]
    tmp_path = tmp_path_factory.mktemp("mistakes")
    results = concurrently(lambda case: mistake(*case, tmp_path), cases)
    return dict(zip(cases, results))


def numbers(pattern, output):
    return [float(x) for x in re.findall(pattern, output)]


def test_mismatched_shapes_are_silent_one_way_and_abort_the_other(mistakes):
    returncode, output = mistakes["mismatched_shapes", False]
    assert "received activations (2, 16, 4) without an error; 64 of 128 values were never written" in output, output
    assert "Received data size doesn't match expected size" in output and "SIGABRT" in output, output[-3000:]
    assert returncode != 0


def test_syncing_only_the_last_micro_batch_leaves_the_replicas_apart(mistakes):
    for fixed, check in ((False, lambda x: x > 1e-2), (True, lambda x: x < 1e-6)):
        returncode, output = mistakes["last_micro_batch_sync", fixed]
        assert returncode == 0, output[-3000:]
        grad_errors = numbers(r"\|gradient - global batch gradient\| = (\S+);", output)
        weight_gaps = numbers(r"the ranks' weights differ by (\S+)", output)
        assert len(grad_errors) == len(weight_gaps) == 2, output
        assert all(map(check, grad_errors + weight_gaps)), (fixed, output)


def test_a_seed_per_rank_gives_every_rank_another_model(mistakes):
    for fixed, check in ((False, lambda x: x > 1e-2), (True, lambda x: x == 0)):
        returncode, output = mistakes["seed_per_rank", fixed]
        assert returncode == 0, output[-3000:]
        gaps = numbers(r"initial weights differ by (\S+)", output)
        assert len(gaps) == 2 and all(map(check, gaps)), (fixed, output)


BREAKPOINT_SCRIPT = """
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
rank = dist.get_rank()
value = torch.tensor([float(rank + 1)])
dist.breakpoint(rank=1)
dist.all_reduce(value)
print(f"rank {rank} continued: {value.item()}", flush=True)
dist.destroy_process_group()
"""


def test_distributed_breakpoint_stops_one_rank_while_the_other_waits(tmp_path):
    """What the README says about dist.breakpoint on gloo: rank 1 gets a pdb prompt on the terminal, `up`
    reaches the caller's frame, and the other rank waits until `c`."""
    script = tmp_path / "breakpoint_run.py"
    script.write_text(BREAKPOINT_SCRIPT)
    torchrun = str(Path(sys.executable).parent / "torchrun")
    pid, terminal = pty.fork()
    if pid == 0:  # the child: torchrun on the pseudo-terminal
        try:
            os.chdir(tmp_path)
            os.execve(torchrun, [torchrun, "--nproc_per_node", "2", str(script)], env(tmp_path))
        finally:
            os._exit(127)
    seen = b""

    def read_until(token, timeout=120):
        nonlocal seen
        deadline = time.time() + timeout
        while token not in seen and time.time() < deadline:
            if select.select([terminal], [], [], 0.5)[0]:
                try:
                    seen += os.read(terminal, 4096)
                except OSError:
                    break
        assert token in seen, seen.decode(errors="replace")[-3000:]

    try:
        read_until(b"(Pdb) ")
        assert b"continued" not in seen  # rank 0 waits too
        os.write(terminal, b"up\n")
        read_until(b"-> dist.breakpoint(rank=1)")
        os.write(terminal, b"p rank, value.item()\n")
        read_until(b"(1, 2.0)")
        os.write(terminal, b"c\n")
        read_until(b"rank 0 continued: 3.0")
        read_until(b"rank 1 continued: 3.0")
        _, status = os.waitpid(pid, 0)
        pid = None
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        if pid is not None:
            workers = [w for c in children(pid) for w in [c, *children(c)]]
            os.kill(pid, signal.SIGTERM)
            time.sleep(5)
            for leftover in [pid, *workers]:
                try:
                    os.kill(leftover, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            os.waitpid(pid, 0)
        os.close(terminal)
