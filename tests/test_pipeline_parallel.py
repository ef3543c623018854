"""Pipeline parallelism (step7: AFAB; step8: AFAB and 1F1B): the layer split, stages that chain back into
the full model, per-step parity with the single-process step3 baseline at pp 2 and 4 (even and uneven
splits), the micro-batches of activations each stage holds, a bad layout, and a rank that dies."""
import os
import re
import signal
import subprocess
import threading
from types import SimpleNamespace
from unittest import mock

import pytest
import torch
from transformers import LlamaConfig

from conftest import ROOT, TRAINING_LOOP, assert_parity, import_step, max_abs_diff, run_env, torchrun_command

GRAD_ACC = 4  # >= every pp_size below, so the pipeline fills
SMALL = ["--seq_len", 32, "--learning_rate", 1e-3, "--micro_batch_size", 1, "--gradient_accumulation_steps", GRAD_ACC,
         "--max_tokens", 20 * GRAD_ACC * 32, *TRAINING_LOOP]  # exactly 20 optimizer steps

# (step, engine, pp_size, num_hidden_layers): every engine of every step at pp 2 and 4, once with the tiny
# model's 4 layers (an even split) and once with 5 (uneven: 3+2 on pp 2, 2+1+1+1 on pp 4).
LAYOUTS = [("step7", "afab", 2, 4), ("step7", "afab", 4, 5),
           ("step8", "afab", 2, 5), ("step8", "afab", 4, 4),
           ("step8", "1f1b", 2, 4), ("step8", "1f1b", 4, 5)]


@pytest.fixture(scope="module")
def runs(torchrun):
    """The baselines (4 and 5 layers) and every pipeline layout, launched two at a time: each launch is
    mostly interpreter start-up, which overlaps well. VERBOSE=1 makes each stage print its sends/receives and
    how many micro-batches it held (step3 ignores it); the run cache is keyed by command line only, and no
    other test launches these step7/step8 command lines."""
    def layers(num_layers):  # 4 is the tiny model's own count: leave the flag out, as other tests do
        return () if num_layers == 4 else ("--num_hidden_layers", num_layers)

    launches = {("step3", "none", 1, num_layers): layers(num_layers) for num_layers in (4, 5)}
    for step, engine, pp_size, num_layers in LAYOUTS:
        launches[(step, engine, pp_size, num_layers)] = (*layers(num_layers), "--pp_size", pp_size,
                                                         "--pp_engine", engine)

    with mock.patch.dict(os.environ, {"VERBOSE": "1"}):
        return torchrun.many({(step, engine, nproc, num_layers): (step, nproc, *SMALL, *args)
                              for (step, engine, nproc, num_layers), args in launches.items()})


@pytest.mark.parametrize("num_layers,pp_size,expected", [
    (4, 2, [(0, 2), (2, 4)]),
    (5, 2, [(0, 3), (3, 5)]),
    (5, 4, [(0, 2), (2, 3), (3, 4), (4, 5)]),
    (22, 4, [(0, 6), (6, 12), (12, 17), (17, 22)]),
    (3, 3, [(0, 1), (1, 2), (2, 3)]),
])
def test_layers_split_contiguously_with_the_extra_layers_on_the_first_stages(num_layers, pp_size, expected):
    pipeline_parallel = import_step("step8", "pipeline_parallel")
    assert [pipeline_parallel.stage_layer_range(num_layers, pp_size, rank) for rank in range(pp_size)] == expected


@pytest.mark.parametrize("step", ["step7", "step8"])
@pytest.mark.parametrize("pp_size", [2, 4])
def test_stages_hold_the_full_models_weights_and_chain_into_its_forward(monkeypatch, step, pp_size):
    pgm, model_module, pipeline_parallel = import_step(step, "process_group_manager", "model", "pipeline_parallel")
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=5,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    full = model_module.Llama(config)
    input_ids = torch.randint(0, 128, (2, 12))
    # positions that do not start at 0: a stage that rebuilt them locally would rotate differently
    position_ids = torch.arange(7, 19).expand(2, 12)

    owners, hidden_states = {}, None
    for pp_rank in range(pp_size):
        grid = SimpleNamespace(pp_rank=pp_rank, pp_world_size=pp_size, pp_is_first_stage=pp_rank == 0,
                               pp_is_last_stage=pp_rank == pp_size - 1)
        monkeypatch.setattr(pgm, "process_group_manager", grid)
        stage = pipeline_parallel.PipelineParallel(full, config)
        for param in stage.parameters():
            assert id(param) not in owners, "a parameter is held by two stages"
            owners[id(param)] = pp_rank
        hidden_states = stage(input_ids, position_ids, hidden_states)
    assert sorted(owners) == sorted(id(p) for p in full.parameters())  # every weight on exactly one stage
    assert owners[id(full.embed_tokens.weight)] == 0
    assert owners[id(full.lm_head.weight)] == owners[id(full.norm.weight)] == pp_size - 1
    torch.testing.assert_close(hidden_states, full(input_ids, position_ids), rtol=0, atol=0)


@pytest.mark.parametrize("step", ["step7", "step8"])
def test_tied_embeddings_are_refused_with_more_than_one_stage(step):
    pgm = import_step(step, "process_group_manager")
    config = SimpleNamespace(num_attention_heads=8, num_key_value_heads=4, num_hidden_layers=4, intermediate_size=768,
                             vocab_size=4096, tie_word_embeddings=True)
    assert pgm.validate_layout(1, 1, 1, 1, config) == []
    (error,) = pgm.validate_layout(2, 1, 2, 1, config)
    assert "tie_word_embeddings is not supported with pp_size 2" in error


@pytest.mark.parametrize("step,engine,pp_size,num_layers", LAYOUTS)
def test_losses_match_the_single_process_baseline(runs, step, engine, pp_size, num_layers):
    reference, run = runs[("step3", "none", 1, num_layers)], runs[(step, engine, pp_size, num_layers)]
    assert_parity(run, reference, steps=20)


@pytest.mark.parametrize("engine", ["1f1b"])
def test_3d_parallelism_matches_the_single_process_baseline(torchrun, engine):
    """tp 2 x pp 2 x dp 2 on 8 processes against one process, with the same global batch of 4 chunks. The command
    lines are those of tests/test_context_parallel.py (its BASELINE and STEP8_3D, which step 9 at cp 1 must
    reproduce): the launcher's cache runs each once for both files."""
    common = ["--seq_len", 32, "--learning_rate", 1e-3, "--gradient_accumulation_steps", 2, "--max_tokens", 20 * 4 * 32,
              *TRAINING_LOOP]
    baseline = torchrun("step3", 1, *common, "--micro_batch_size", 2)
    run = torchrun("step8", 8, *common, "--micro_batch_size", 1, "--tp_size", 2, "--pp_size", 2, "--dp_size", 2,
                   "--pp_engine", engine)
    assert run.returncode == 0, run
    assert len(run.losses) == 20 and run.losses[-1] < run.losses[0] - 1.0
    assert abs(run.losses[0] - baseline.losses[0]) <= 1e-5
    assert max_abs_diff(run.losses, baseline.losses) <= 1e-4, (run.losses, baseline.losses)
    assert_parity(run, baseline, steps=20)  # and the training loop: the same learning rates and gradient norms
    assert all(m["tokens_per_second_per_device"] == pytest.approx(m["tokens_per_second"] / 8) for m in run.metrics)


@pytest.mark.parametrize("step,engine,pp_size,num_layers", LAYOUTS)
def test_activations_held_per_stage(runs, step, engine, pp_size, num_layers):
    run = runs[(step, engine, pp_size, num_layers)]
    assert run.returncode == 0, run
    peaks = {}
    for pp_rank, held in re.findall(rf"\[rank \d+ \| stage (\d+)/{pp_size}\] {engine}: held at most (\d+) micro-batches",
                                    run.stdout):
        peaks.setdefault(int(pp_rank), []).append(int(held))
    assert sorted(peaks) == list(range(pp_size)), run.stdout[-3000:]
    for pp_rank, per_step in peaks.items():
        assert len(per_step) == 20
        # AFAB holds every micro-batch; 1F1B holds its warm-up plus one: pp_size - pp_rank
        expected = GRAD_ACC if engine == "afab" else pp_size - pp_rank
        assert set(per_step) == {expected}, (pp_rank, per_step)


def test_verbose_prints_every_send_and_receive_with_peer_and_shape(runs):
    run = runs[("step8", "1f1b", 2, 4)]
    assert run.returncode == 0, run
    # Searched in the whole output, not line by line: the step line is printed in two writes (text, then
    # newline), so another rank's line can land between them.
    # stage 0 sends every micro-batch's activations to rank 1, and rank 1 every gradient back
    stage0_sends = re.findall(r"\[rank 0 \| stage 0/2\] \w+: send \(1, 32, 256\) -> rank 1\n", run.stdout)
    stage1_sends = re.findall(r"\[rank 1 \| stage 1/2\] \w+: send \(1, 32, 256\) -> rank 0\n", run.stdout)
    assert len(stage0_sends) == len(stage1_sends) == 20 * GRAD_ACC
    assert "[rank 0 | stage 0/2] send_forward_recv_backward: recv (1, 32, 256) <- rank 1\n" in run.stdout


def test_more_stages_than_layers_is_a_clear_error(torchrun):
    run = torchrun("step8", 2, *SMALL, "--pp_size", 2, "--num_hidden_layers", 1, timeout=60)
    assert run.returncode != 0
    error_lines = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert error_lines == ["error: pp_size 2 is larger than num_hidden_layers 1: every pipeline stage needs at "
                           "least one layer"], run
    assert "Step: 1" not in run.stdout


def child_pids(parent):
    """Processes whose parent is `parent`, from /proc/<pid>/stat: "pid (name) state ppid ..."."""
    children = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):  # not a process, or one that just ended
            continue
        if int(fields[1]) == parent:
            children.append(int(entry))
    return children


def test_a_rank_killed_mid_training_ends_the_job(tmp_path):
    """SIGKILL the first stage's worker while training. torchrun's agent sees a worker die and stops the
    others; even without it, the neighbour's pending gloo recv fails with 'Connection reset by peer'."""
    command = torchrun_command("step8", 2, [*SMALL[:-2], "--max_tokens", 10**9, "--pp_size", 2, "--pp_engine", "1f1b"])
    job = subprocess.Popen(command, cwd=ROOT, env=run_env(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True, start_new_session=True)
    watchdog = threading.Timer(180, os.killpg, (job.pid, signal.SIGKILL))  # a hang fails the test, not the suite
    watchdog.start()
    try:
        output = []
        for line in job.stdout:
            output.append(line)
            if line.startswith("Step: 2 "):
                break
        assert output and output[-1].startswith("Step: 2 "), "".join(output)[-3000:]
        ranks = {}
        for pid in child_pids(job.pid):  # torchrun's workers
            environ = dict(v.split("=", 1) for v in open(f"/proc/{pid}/environ").read().split("\0") if "=" in v)
            if "RANK" in environ:
                ranks[int(environ["RANK"])] = pid
        assert sorted(ranks) == [0, 1], ranks
        os.kill(ranks[0], signal.SIGKILL)
        returncode = job.wait(timeout=60)
        output.append(job.stdout.read())
    finally:
        watchdog.cancel()
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
    assert returncode != 0
    assert "SIGKILL" in "".join(output)
