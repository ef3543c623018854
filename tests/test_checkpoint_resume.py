"""Checkpoints, resume and resharding: step 10 resumes bit for bit in every kind of layout, resumes in another layout
(resharding) matching an uninterrupted run of that layout, and honours a new learning rate; step 11 resumes its
ZeRO checkpoints in the same layout (fp32 and bf16) bit for bit, in another layout and zero stage, and a step-10
checkpoint; each ZeRO shard is written once. The runs that save are shared with the other checkpoint tests
(tests/checkpoint_runs.py)."""
import json

import pytest
from safetensors import safe_open
from transformers import LlamaConfig

from checkpoint_runs import COMMON, LAYOUTS, SAVE_AT, halfway_copy
from conftest import GRAD_NORM_EVERY_STEP, concurrently, import_step, max_abs_diff, max_relative_diff

# cp 2 alone is not here: cp2_tp2 resumes its context-parallel split, and cp2_pp2 reshards into one
SAME_LAYOUT = ["baseline", "tp2", "dp2_bucket", "pp2_1f1b", "cp2_tp2"]
RESHARD = [("tp2_pp2", "baseline"), ("dp2_bucket", "tp2"), ("baseline", "cp2_pp2")]  # (saved in, resumed in)


@pytest.fixture(scope="module")
def resumed(torchrun, full_runs, tmp_path_factory):
    """Steps 4-6 again, from the step-3 checkpoint: (saved in, resumed in) -> run. The same layout for
    SAME_LAYOUT, another one for RESHARD; and once with a new learning rate."""
    def launch(item):
        (source, target), extra = item
        save_dir = halfway_copy(full_runs[source][1], tmp_path_factory.mktemp(f"resume_{source}_{target}") / "ckpt")
        nproc, args = LAYOUTS[target]
        return (source, target, *extra), torchrun("step10", nproc, *COMMON, *args, *extra, "--save_dir", save_dir,
                                                  "--resume")

    items = [((name, name), ()) for name in SAME_LAYOUT] + [(pair, ()) for pair in RESHARD]
    items.append((("baseline", "baseline"), ("--learning_rate", 5e-4)))
    return dict(concurrently(launch, items))


@pytest.mark.parametrize("name", SAME_LAYOUT)
def test_resume_in_the_same_layout_continues_the_same_losses_bit_for_bit(full_runs, resumed, name):
    full, save_dir = full_runs[name]
    assert full.returncode == 0, full
    # one file per (pipeline stage, tensor shard): the dp and cp ranks hold copies and do not write
    files = {"baseline": 1, "tp2": 2, "dp2_bucket": 1, "pp2_1f1b": 2, "cp2_tp2": 2}[name]
    for checkpoint in ("step_000003", "step_000006"):
        assert len(list((save_dir / checkpoint).glob("pp*_tp*.safetensors"))) == files
        assert (save_dir / checkpoint / "COMPLETE").exists()
    run = resumed[(name, name)]
    assert run.returncode == 0, run
    assert "resumed from step 3" in run.stdout
    assert [m["step"] for m in run.metrics] == [4, 5, 6]
    assert run.losses == full.losses[SAVE_AT:]  # identical floats, not merely close
    assert run.grad_norms == full.grad_norms[SAVE_AT:] and run.lrs == full.lrs[SAVE_AT:]


@pytest.mark.parametrize("source,target", RESHARD)
def test_resume_in_another_layout_matches_an_uninterrupted_run_of_that_layout(full_runs, resumed, source, target):
    reference = full_runs[target][0]
    run = resumed[(source, target)]
    assert run.returncode == 0, run
    assert [m["step"] for m in run.metrics] == [4, 5, 6]
    first, worst = abs(run.losses[0] - reference.losses[SAVE_AT]), max_abs_diff(run.losses, reference.losses[SAVE_AT:])
    print(f"{source} -> {target}: |dloss| at step 4 {first:.2e}, max over steps 4-6 {worst:.2e}")
    assert first <= 1e-5 and worst <= 1e-4, (run.losses, reference.losses)
    # a model that lost its trained weights would start again near ln(4096) = 8.3
    assert run.losses[0] < reference.losses[0] - 0.3
    # saved at step 3 of a 5-step warm-up: the schedule and the clipping continue where they were
    assert run.lrs == reference.lrs[SAVE_AT:] and run.lrs[0] == pytest.approx(0.8e-3)
    assert max_relative_diff(run.grad_norms, reference.grad_norms[SAVE_AT:]) <= GRAD_NORM_EVERY_STEP


def test_a_new_learning_rate_is_honoured_and_said(full_runs, resumed):
    full = full_runs["baseline"][0]
    run = resumed[("baseline", "baseline", "--learning_rate", 5e-4)]
    assert run.returncode == 0, run
    assert "--learning_rate 0.0005 replaces the checkpoint's 0.001" in run.stdout
    assert run.losses[0] == full.losses[SAVE_AT]  # step 4's loss comes from step 3's weights
    assert abs(run.losses[1] - full.losses[SAVE_AT + 1]) > 1e-3  # step 5's from an update at the new rate


@pytest.mark.parametrize("name", ["dp2_zero2", "bf16_dp2_zero1"])
def test_zero_resume_in_the_same_layout_continues_bit_for_bit(zero_runs, name):
    """In bf16 too: the checkpoint holds the fp32 master, not the bf16 weights."""
    full, _ = zero_runs[name]
    run = zero_runs[(name, name)]
    assert full.returncode == 0, full
    assert run.returncode == 0, run
    assert [m["step"] for m in run.metrics] == [4, 5, 6]
    assert run.losses == full.losses[SAVE_AT:]
    assert run.grad_norms == full.grad_norms[SAVE_AT:] and run.lrs == full.lrs[SAVE_AT:]


def test_each_zero_shard_is_written_once_by_the_rank_that_owns_it(zero_runs, torchrun):
    _, save_dir = zero_runs["dp2_zero2"]
    files = sorted((save_dir / "step_000003").glob("*.safetensors"))
    assert [f.name for f in files] == ["pp00_tp00_shard00.safetensors", "pp00_tp00_shard01.safetensors"]
    written = {}  # tensor -> [(start, end)] over both files
    for path in files:
        with safe_open(path, framework="pt") as f:
            ranges = json.loads(f.metadata()["json"])["ranges"]
            for key in f.keys():
                if key.startswith("model."):
                    start, end, _ = ranges[key.removeprefix("model.")]
                    assert f.get_tensor(key).numel() == end - start
                    written.setdefault(key, []).append((start, end))
    model = import_step("step11", "model")
    sizes = {f"model.{name}": p.numel() for name, p in model.Llama(LlamaConfig.from_dict(
        json.loads(safe_open(files[0], framework="pt").metadata()["json"])["run"]["config"])).named_parameters()}
    assert set(written) == set(sizes)
    for key, spans in written.items():  # the pieces of each tensor tile it: no gap, no element written twice
        spans.sort()
        assert spans[0][0] == 0 and spans[-1][1] == sizes[key], (key, spans)
        assert all(a[1] == b[0] for a, b in zip(spans, spans[1:])), (key, spans)
    assert sum(end - start for spans in written.values() for start, end in spans) == sum(sizes.values())


@pytest.mark.parametrize("target,reference", [("baseline", "baseline"), ("cp2_pp2_zero1", "cp2_pp2")])
def test_a_zero_2_checkpoint_resumes_in_another_layout_and_stage(zero_runs, full_runs, target, reference):
    """dp 2 ZeRO-2 -> one process at stage 0, or cp 2 x pp 2 at ZeRO-1 (sharded over the cp ranks of each stage):
    the losses of an uninterrupted run of the target layout (step 10's, which step 11 at fp32 reproduces)."""
    run, reference = zero_runs[("dp2_zero2", target)], full_runs[reference][0]
    assert run.returncode == 0, run
    assert [m["step"] for m in run.metrics] == [4, 5, 6]
    assert abs(run.losses[0] - reference.losses[SAVE_AT]) <= 1e-5
    assert max_abs_diff(run.losses, reference.losses[SAVE_AT:]) <= 1e-4, (run.losses, reference.losses)
    assert run.lrs == reference.lrs[SAVE_AT:]
    assert max_relative_diff(run.grad_norms, reference.grad_norms[SAVE_AT:]) <= GRAD_NORM_EVERY_STEP


def test_a_step_10_checkpoint_resumes_in_step_11_bit_for_bit(zero_runs, full_runs):
    """Step 10's file layout (one file per tensor shard, whole tensors) read by step 11, which at fp32 and stage 0
    takes step 10's steps exactly."""
    run, reference = zero_runs[("step10", "baseline")], full_runs["baseline"][0]
    assert run.returncode == 0, run
    assert "resumed from step 3" in run.stdout
    assert run.losses == reference.losses[SAVE_AT:]
    assert run.grad_norms == reference.grad_norms[SAVE_AT:] and run.lrs == reference.lrs[SAVE_AT:]
