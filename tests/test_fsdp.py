"""Step 12, ZeRO-3 (fully sharded data parallelism): dp 2, dp 4, dp 2 x tp 2, dp 2 x pp 2 (1F1B) and dp 2 x cp 2
at --zero_stage 3 train the single-process run (the parity contract); at dp 2 stage 3 takes exactly the steps
of step 11's stage 2 (step 12's stage 2 is step 11's, bit for bit: tests/zero_check.py). A stage-3 checkpoint resumes bit for
bit, on one process at stage 0, and a stage-0 checkpoint resumes at stage 3 under dp 2 x tp 2; the export loads in
transformers. What a rank holds between units and in flight is checked from inside a run by tests/zero_check.py
(tests/test_zero.py)."""
import json
import os
import shutil

import pytest

from checkpoint_helpers import export_and_compare
from checkpoint_runs import COMMON as CHECKPOINT_COMMON
from checkpoint_runs import LAYOUTS as CHECKPOINT_LAYOUTS
from checkpoint_runs import SAVE_AT, halfway_copy
from conftest import ROOT, assert_parity, concurrently, max_abs_diff
from test_zero import BASELINE, COMMON, DP2, LAYOUTS

FSDP_LAYOUTS = {
    "dp2": (2, *DP2),
    "dp4": (4, "--micro_batch_size", 1, "--gradient_accumulation_steps", 1, "--dp_size", 4),
    "dp2_tp2": (4, *DP2, "--tp_size", 2),
    "dp2_pp2_1f1b": (4, *DP2, "--pp_size", 2, "--pp_engine", "1f1b"),
    "dp2_cp2": (4, *DP2, "--cp_size", 2),
}


@pytest.fixture(scope="module")
def tied_model(tmp_path_factory):
    """The embedded tiny Llama's config and tokenizer with tie_word_embeddings: the LM head is the embedding."""
    folder = tmp_path_factory.mktemp("tied_llama")
    for path in (ROOT / "assets" / "tiny_llama").iterdir():
        if path.suffix != ".safetensors":
            shutil.copy(path, folder / path.name)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))
    return folder


@pytest.fixture(scope="module")
def runs(torchrun, tied_model):
    """Every launch of this module, two at a time; the baseline and step 11's runs are shared with
    tests/test_zero.py (the launcher caches them)."""
    launches = {"baseline": BASELINE,
                "baseline_tied": (*BASELINE, "--model_name", tied_model),
                "zero3_dp2_tied": ("step12", 2, *COMMON, *DP2, "--zero_stage", 3, "--model_name", tied_model),
                **{f"zero3_{name}": ("step12", nproc, *COMMON, *args, "--zero_stage", 3)
                   for name, (nproc, *args) in FSDP_LAYOUTS.items()},
                "step11_dp2_zero2": ("step11", *LAYOUTS["dp2_zero2"][:1], *COMMON, *LAYOUTS["dp2_zero2"][1:]),
}
    return torchrun.many(launches)


@pytest.mark.parametrize("layout", FSDP_LAYOUTS)
def test_zero_3_matches_the_single_process_baseline(runs, layout):
    assert_parity(runs[f"zero3_{layout}"], runs["baseline"], steps=20)
    assert "zero stage 3" in runs[f"zero3_{layout}"].stdout


def test_zero_3_with_tied_embeddings_matches_the_single_process_baseline(runs):
    """The tied unit (embedding, norm and LM head, one weight at both ends) at dp 2: the parity contract against
    step 3 on one process with the same tied model; tests/zero_check.py counts its units whole at once."""
    assert_parity(runs["zero3_dp2_tied"], runs["baseline_tied"], steps=20)
    assert runs["baseline_tied"].losses != runs["baseline"].losses  # the tie changes the model


def test_zero_3_takes_the_steps_of_zero_2_bit_for_bit_at_dp_2(runs):
    """Stage 3 changes where the parameters live, not the arithmetic: gathering copies them exactly, and the
    gradients are reduce-scattered per micro-batch as at stage 2 (two ranks: one rounding per sum)."""
    stage2, stage3 = runs["step11_dp2_zero2"], runs["zero3_dp2"]
    assert stage2.returncode == 0, stage2
    assert stage3.returncode == 0, stage3
    assert len(stage3.losses) == 20 and stage3.losses == stage2.losses  # identical floats


# Checkpoints: the layouts of tests/checkpoint_runs.py (3 layers, 6 steps, saves at step 3 and 6).
ZERO3_DP2 = (2, *CHECKPOINT_LAYOUTS["dp2_bucket"][1], "--zero_stage", 3)
BASELINE_ZERO0 = (1, *CHECKPOINT_LAYOUTS["baseline"][1], "--zero_stage", 0)
ZERO3_DP2_TP2 = (4, "--micro_batch_size", 1, "--gradient_accumulation_steps", 2, "--dp_size", 2, "--tp_size", 2,
                 "--zero_stage", 3)


@pytest.fixture(scope="module")
def checkpoint_runs(torchrun, tmp_path_factory):
    """A stage-3 run at dp 2 that saves at step 3 and 6; from its step-3 checkpoint, steps 4-6 again at dp 2 stage
    3 and on one process at stage 0 (which saves after every step, keeping them all); from that stage-0 step-4 checkpoint, steps 5-6
    at dp 2 x tp 2, stage 3."""
    def run(layout, save_dir, *extra):
        nproc, *args = layout
        return torchrun("step12", nproc, *CHECKPOINT_COMMON, *args, "--save_dir", save_dir, *extra)

    save_dir = tmp_path_factory.mktemp("ckpt12_zero3_dp2")
    runs = {"zero3_dp2": (run(ZERO3_DP2, save_dir, "--save_every", SAVE_AT), save_dir)}

    def resume(item):
        name, layout, extra = item
        copy = halfway_copy(save_dir, tmp_path_factory.mktemp(f"resume12_{name}") / "ckpt")
        return name, (run(layout, copy, "--resume", *extra), copy)

    runs.update(concurrently(resume, [("zero3_dp2_again", ZERO3_DP2, ()),
                                      ("baseline_zero0", BASELINE_ZERO0, ("--save_every", 1, "--keep_last", 4))]))
    stage0_dir = runs["baseline_zero0"][1]
    step4 = tmp_path_factory.mktemp("resume12_tp2") / "ckpt"
    shutil.copytree(stage0_dir, step4, ignore=shutil.ignore_patterns("step_000005", "step_000006"))
    runs["zero3_dp2_tp2"] = (run(ZERO3_DP2_TP2, step4, "--resume"), step4)
    return runs


def test_a_zero_3_checkpoint_resumes_bit_for_bit(checkpoint_runs):
    (full, save_dir), (run, _) = checkpoint_runs["zero3_dp2"], checkpoint_runs["zero3_dp2_again"]
    assert full.returncode == 0, full
    assert run.returncode == 0, run
    # each rank wrote its own pieces: two files, nothing gathered to one rank
    assert sorted(p.name for p in (save_dir / "step_000003").glob("*.safetensors")) == [
        "pp00_tp00_shard00.safetensors", "pp00_tp00_shard01.safetensors"]
    assert [m["step"] for m in run.metrics] == [4, 5, 6]
    assert run.losses == full.losses[SAVE_AT:]  # identical floats
    assert run.grad_norms == full.grad_norms[SAVE_AT:] and run.lrs == full.lrs[SAVE_AT:]


def test_a_zero_3_checkpoint_resumes_at_stage_0_and_back_at_stage_3_in_another_layout(checkpoint_runs):
    """dp 2 stage 3 -> one process, stage 0 (steps 4-6) -> dp 2 x tp 2, stage 3 (steps 5-6): every run trains
    what the uninterrupted stage-3 run trained, within the parity contract."""
    full = checkpoint_runs["zero3_dp2"][0]
    stage0, back = checkpoint_runs["baseline_zero0"][0], checkpoint_runs["zero3_dp2_tp2"][0]
    assert stage0.returncode == 0, stage0
    assert back.returncode == 0, back
    assert [m["step"] for m in stage0.metrics] == [4, 5, 6] and [m["step"] for m in back.metrics] == [5, 6]
    assert abs(stage0.losses[0] - full.losses[SAVE_AT]) <= 1e-5
    assert max_abs_diff(stage0.losses, full.losses[SAVE_AT:]) <= 1e-4, (stage0.losses, full.losses)
    assert max_abs_diff(back.losses, full.losses[SAVE_AT + 1:]) <= 1e-4, (back.losses, full.losses)
    assert back.losses[0] < full.losses[0] - 0.3  # trained weights, not a fresh start


def test_export_of_a_zero_3_checkpoint_loads_in_transformers(checkpoint_runs, tmp_path):
    full, save_dir = checkpoint_runs["zero3_dp2"]
    assert full.returncode == 0, full
    export_and_compare(save_dir, tmp_path / "hf")


def test_the_seed_stream_gives_the_full_build_one_tensor_at_a_time():
    """Issue 29, item 1: step 12 builds no whole model; model.seeded_parameters draws what Llama(config) draws from the
    seed, in the same order, one tensor at a time: bit for bit the values of every earlier step's full build (tied
    or not, with biases or not)."""
    import torch
    from transformers import LlamaConfig

    from conftest import import_step
    model = import_step("step12", "model")
    for tied, bias in ((False, False), (True, True)):
        config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                             attention_bias=bias, mlp_bias=bias)
        torch.manual_seed(3)
        full = dict(model.Llama(config).named_parameters())
        streamed = list(model.seeded_parameters(config, seed=3))
        assert [name for name, _ in streamed] == list(full)
        for name, tensor in streamed:
            assert torch.equal(tensor, full[name]), name


class ReadsRecorded:
    """A checkpoint file that notes the (key, start, stop) of every slice read from it."""

    def __init__(self, file, reads):
        self.file, self.reads = file, reads

    def get_slice(self, key):
        file, reads = self.file, self.reads

        class Slice:
            def __getitem__(self, index):
                reads.append((key, index.start, index.stop))
                return file.get_slice(key)[index]
        return Slice()

    def get_tensor(self, key):
        return self.file.get_tensor(key)


def test_a_resume_reads_only_the_pieces_it_owns_and_the_files_are_hashed_once_across_the_ranks(checkpoint_runs,
                                                                                               monkeypatch):
    """Issue 29, item 1. A dp 2, stage 3 checkpoint (two files, one per ZeRO shard): the rows of a matrix that lie
    in shard 1's piece are read from shard 1's file alone, and only them; blocks read that way equal the whole tensor.
    damage() hashes each file on one rank (file i on rank i mod 2) and every rank takes the same verdict."""
    import torch

    from conftest import import_step
    checkpoint = import_step("step12", "checkpoint")
    folder = str(checkpoint_runs["zero3_dp2"][1] / "step_000003")
    saved = checkpoint.SavedTensors(folder)
    key = "model.layers.0.mlp.up_proj.weight"
    rows, cols = saved.shape(key)
    full = checkpoint.read_full_tensors(folder, lambda k: k == key)[key]
    assert torch.equal(saved.read_block(key, (0, rows), (0, cols)), full)
    [(start, end, path)] = [piece for piece in saved.pieces[key][0] if piece[2].endswith("shard01.safetensors")]
    first, last = -(-start // cols), end // cols  # whole rows inside shard 1's piece
    assert last - first >= 2
    reads = {path: [] for path in saved.files}
    saved.files = {path: ReadsRecorded(file, reads[path]) for path, file in saved.files.items()}
    assert torch.equal(saved.read_block(key, (first, last), (8, 24)), full[first:last, 8:24])
    assert reads == {**{p: [] for p in reads}, path: [(key, first * cols - start, last * cols - start)]}

    guards = import_step("step12", "save_dir")  # the damage checks sit with the --save_dir guards
    checked = []
    monkeypatch.setattr(guards, "file_damage", lambda path, step, save_id: checked.append(path) or (
        "its tensors do not match their checksum" if path.endswith("shard01.safetensors") else None))
    monkeypatch.setattr(guards.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(guards.dist, "get_world_size", lambda group=None: 2)
    verdicts, gathered = [], {}
    for rank in (0, 1):
        monkeypatch.setattr(guards.dist, "get_rank", lambda group=None, rank=rank: rank)
        # every rank's problem, as the gather gives them: rank 1's from its own check of shard 1
        monkeypatch.setattr(guards.dist, "all_gather_object", lambda out, problem, rank=rank: (
            gathered.setdefault(rank, problem), out.__setitem__(slice(None), [
                None, "pp00_tp00_shard01.safetensors: its tensors do not match their checksum"])))
        verdicts.append(guards.damage(folder))
    assert sorted(map(os.path.basename, checked)) == ["pp00_tp00_shard00.safetensors", "pp00_tp00_shard01.safetensors"]
    assert gathered == {0: None, 1: "pp00_tp00_shard01.safetensors: its tensors do not match their checksum"}
    assert verdicts == ["pp00_tp00_shard01.safetensors: its tensors do not match their checksum"] * 2
