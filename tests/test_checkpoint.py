"""Checkpoints: exact resume, saves that survive SIGKILL, --init_from_hf, and refusing bad checkpoints."""
import hashlib
import os
import re
import shutil
import signal
import subprocess
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import ROOT, import_step, run_env, torchrun_command

SMALL = ["--seq_len", 32, "--micro_batch_size", 2, "--gradient_accumulation_steps", 2, "--learning_rate", 1e-3]
STEP_TOKENS = 2 * 2 * 32  # tokens per optimizer step with SMALL and dp_size 1


def tree_digest(folder):
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(folder).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


# 20 optimizer steps of a global batch of 4 chunks, as in the parallel-layout tests (their runs are shared)
PARITY = ["--seq_len", 32, "--learning_rate", 1e-3, "--max_tokens", 20 * 4 * 32]
RESUME_LAYOUTS = {
    "baseline": ("step3", 1, ["--micro_batch_size", 2, "--gradient_accumulation_steps", 2]),
    "tp2": ("step4", 2, ["--micro_batch_size", 2, "--gradient_accumulation_steps", 2, "--tp_size", 2]),
    "dp2_bucket": ("step6", 2, ["--micro_batch_size", 1, "--gradient_accumulation_steps", 2, "--dp_size", 2,
                                "--bucket_size_mb", 1]),
    "pp2_1f1b": ("step8", 2, ["--micro_batch_size", 1, "--gradient_accumulation_steps", 4, "--pp_size", 2,
                              "--pp_engine", "1f1b"]),
}


@pytest.fixture(scope="module")
def first_halves(torchrun, tmp_path_factory):
    """The first 10 of the 20 steps of every layout, saving at step 7 and at the end (step 10)."""
    runs = {}
    for name, (step, nproc, args) in RESUME_LAYOUTS.items():
        save_dir = tmp_path_factory.mktemp(f"ckpt_{name}")
        run = torchrun(step, nproc, *PARITY, *args, "--max_tokens", 10 * 4 * 32, "--save_dir", save_dir,
                       "--save_every", 7, "--keep_last", 1)
        runs[name] = (run, save_dir)
    return runs


@pytest.mark.parametrize("name", RESUME_LAYOUTS)
def test_resume_continues_the_same_losses_bit_for_bit(torchrun, first_halves, name):
    step, nproc, args = RESUME_LAYOUTS[name]
    first, save_dir = first_halves[name]
    assert first.returncode == 0, first
    assert sorted(p.name for p in save_dir.iterdir()) == ["step_000010"]  # step 7 pruned by --keep_last 1
    assert len(list((save_dir / "step_000010").glob("rank_*.safetensors"))) == nproc  # one part per rank
    second = torchrun(step, nproc, *PARITY, *args, "--save_dir", save_dir, "--resume")
    full = torchrun(step, nproc, *PARITY, *args)
    assert second.returncode == 0 and full.returncode == 0, second
    assert "resumed from step 10" in second.stdout
    assert [m["step"] for m in second.metrics] == list(range(11, 21))
    assert first.losses + second.losses == full.losses  # identical floats, not merely close


@pytest.fixture(scope="module")
def big_model_dir(tmp_path_factory):
    """The embedded tokenizer with a wider model, so that a save takes long enough to be interrupted."""
    folder = tmp_path_factory.mktemp("wide_model")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(ROOT / "assets" / "tiny_llama" / name, folder / name)
    config = LlamaConfig(vocab_size=4096, hidden_size=768, intermediate_size=3072, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256)
    config.save_pretrained(folder)
    return folder


def process_tree(pid):
    """pid and all its descendants (torchrun starts its workers in sessions of their own)."""
    children = {}
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                fields = open(f"/proc/{stat}/stat").read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(stat))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    return tree


def kill_tree(pid):
    for member in process_tree(pid):
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_usable(big_model_dir, tmp_path):
    save_dir = tmp_path / "ckpt"
    args = ["--model_name", big_model_dir, "--seq_len", 16, "--micro_batch_size", 1, "--gradient_accumulation_steps", 1,
            "--max_tokens", 16 * 50, "--save_dir", save_dir, "--save_every", 1, "--keep_last", 5]
    proc = subprocess.Popen(torchrun_command("step3", 1, args), cwd=ROOT, env=run_env(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_during_save = False
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None and not killed_during_save:
            # safetensors first writes a hidden temporary file, then we rename it into place
            writing = [p for p in save_dir.glob("step_*/*") if ".tmp" in p.name]
            if list(save_dir.glob("step_*/COMPLETE")) and writing:  # one checkpoint done, the next half-written
                kill_tree(proc.pid)
                killed_during_save = True
            time.sleep(0.002)
    finally:
        kill_tree(proc.pid)
        proc.wait()
    assert killed_during_save, "never caught a save in progress"
    # The newest checkpoint folder is the one the kill interrupted: a .tmp file or a rank file, no COMPLETE.
    folders = sorted(save_dir.iterdir())
    assert not (folders[-1] / "COMPLETE").exists(), [str(p.relative_to(save_dir)) for p in save_dir.rglob("*")]
    latest = [d.name for d in folders if (d / "COMPLETE").exists()][-1]
    assert latest < folders[-1].name

    resumed = subprocess.run(torchrun_command("step3", 1, [*args[:-6], "--max_tokens", 16 * (int(latest[5:]) + 2),
                                                           "--save_dir", save_dir, "--resume"]),
                             cwd=ROOT, env=run_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {int(latest[5:])}" in resumed.stdout  # ...and resume skips it


def make_hf_checkpoint(folder, tied, shard=False, layers=2):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(ROOT / "assets" / "tiny_llama" / name, folder / name)
    config = LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=160, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         rms_norm_eps=1e-5, tie_word_embeddings=tied)
    torch.manual_seed(3)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # non-trivial norms, so a misplaced norm weight would show in the loss
                param.add_(0.2 * torch.randn_like(param))
            if "embed_tokens" in name or "lm_head" in name:  # confident logits: a loss far from ln(vocab)
                param.mul_(10)
    model.save_pretrained(folder, max_shard_size="150KB" if shard else "5GB")
    return model


def transformers_first_step_loss(model, model_dir, monkeypatch, micro_batch_size, grad_acc):
    """transformers' loss on the first global batch the training run sees."""
    pgm, dataloader = import_step("step3", "process_group_manager", "dataloader")
    monkeypatch.setattr(pgm, "process_group_manager", SimpleNamespace(dp_world_size=1, dp_rank=0, global_rank=0))
    loader = dataloader.MicroBatchDataLoader(micro_batch_size, 32, str(ROOT / "assets" / "tiny_stories"),
                                             str(model_dir), grad_acc, seed=42)
    losses = []
    with torch.no_grad():
        for _ in range(grad_acc):
            batch = next(loader)
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
            losses.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["target_ids"].reshape(-1)))
    return torch.stack(losses).mean().item()


@pytest.mark.parametrize("step,nproc,layout,tied,shard", [
    ("step3", 1, [], False, False),
    ("step3", 1, [], True, True),
    ("step4", 2, ["--tp_size", 2], True, True),  # tied embeddings stay tied under tensor parallelism
    ("step4", 2, ["--tp_size", 2], False, False),
    ("step8", 2, ["--pp_size", 2, "--pp_engine", "1f1b"], False, True),
])
def test_init_from_hf_starts_at_transformers_loss(torchrun, tmp_path, monkeypatch, step, nproc, layout, tied, shard):
    model = make_hf_checkpoint(tmp_path, tied=tied, shard=shard)
    files = sorted(p.name for p in tmp_path.glob("model*.safetensors*"))
    assert ("model.safetensors.index.json" in files) == shard and len(files) >= (3 if shard else 1)
    expected = transformers_first_step_loss(model, tmp_path, monkeypatch, 2, 2)
    run = torchrun(step, nproc, *SMALL, *layout, "--model_name", tmp_path, "--init_from_hf", tmp_path,
                   "--max_tokens", STEP_TOKENS)
    assert run.returncode == 0, run
    if step != "step3":
        return  # the fresh-model comparison below is the same for every layout
    assert abs(run.losses[0] - expected) <= 1e-4, (run.losses[0], expected)
    # a fresh random model of this config starts near ln(4096) = 8.32, far from the loaded model's loss
    fresh = torchrun("step3", 1, *SMALL, "--model_name", tmp_path, "--max_tokens", STEP_TOKENS)
    assert abs(fresh.losses[0] - expected) > 0.5, (fresh.losses[0], expected)


def test_bad_checkpoints_are_refused_and_left_untouched(torchrun, tmp_path):
    save_dir = tmp_path / "ckpt"
    saved = torchrun("step3", 1, *SMALL, "--max_tokens", 2 * STEP_TOKENS, "--save_dir", save_dir)
    assert saved.returncode == 0, saved
    checkpoint = save_dir / "step_000002"
    rank_file = checkpoint / "rank_000.safetensors"

    def resume(*extra):
        before = tree_digest(save_dir)
        run = torchrun("step3", 1, *SMALL, "--max_tokens", 4 * STEP_TOKENS, "--save_dir", save_dir, "--resume",
                       *extra, cached=False)
        assert run.returncode != 0
        assert tree_digest(save_dir) == before  # nothing overwritten
        assert "Step: 3" not in run.stdout
        return [line for line in run.stderr.splitlines() if line.startswith("error: ")]

    (error,) = resume("--num_key_value_heads", 2)  # wrong shapes
    assert "does not fit the model" in error and "k_proj.weight: checkpoint (128, 256) vs model (64, 256)" in error
    (error,) = resume("--num_hidden_layers", 3)
    assert "(9 tensors, first 5)" in error and re.search(r"layers\.3\.\S+: unexpected", error)

    original = rank_file.read_bytes()
    rank_file.write_bytes(original[: len(original) // 2])  # truncated file
    (error,) = resume()
    assert "cannot read checkpoint file" in error and "rank_000.safetensors" in error

    rank_file.unlink()  # missing rank file
    (error,) = resume()
    assert "has no file for rank 0" in error

    shutil.rmtree(checkpoint)
    (error,) = resume()
    assert "no complete checkpoint" in error


def test_resuming_with_another_layout_is_refused(torchrun, first_halves):
    _, save_dir = first_halves["dp2_bucket"]
    before = tree_digest(save_dir)
    step, nproc, args = RESUME_LAYOUTS["dp2_bucket"]
    run = torchrun("step6", 2, *PARITY, "--micro_batch_size", 2, "--gradient_accumulation_steps", 2, "--tp_size", 2,
                   "--save_dir", save_dir, "--resume", cached=False)
    assert run.returncode != 0
    assert "saved with layout {'world_size': 2, 'tp_size': 1, 'pp_size': 1, 'dp_size': 2}" in run.stderr
    assert "this run has {'world_size': 2, 'tp_size': 2, 'pp_size': 1, 'dp_size': 1}" in run.stderr
    assert tree_digest(save_dir) == before and "Step: 11" not in run.stdout
