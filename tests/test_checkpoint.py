"""Checkpoints (step10, step11): bit-exact resume in every kind of layout, resuming in another layout (resharding),
export to Hugging Face, --init_from_hf, a save killed with SIGKILL, the refusals that keep a run from being
lost or mixed up with another, and no checkpointing in the steps before 10. Step 11: ZeRO shards saved once
each, resumed in the same layout (fp32 and bf16) bit for bit, in another layout and zero stage, a step-10
checkpoint resumed by step 11, and the export of a ZeRO-2 checkpoint."""
import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from conftest import (GRAD_NORM_EVERY_STEP, ROOT, TRAINING_LOOP, import_step, max_abs_diff, max_relative_diff, run_env,
                      step_dir, torchrun_command)

STEPS, SAVE_AT = 6, 3  # every run below trains 6 optimizer steps and saves at step 3 and at the end
# A global batch of 4 sequences; 3 layers rather than the tiny model's 4: pipeline stages split them unevenly (2 + 1),
# and an export must carry the override into its config.
# The training loop of the parity runs: the save at step 3 falls inside the 5 warm-up steps.
COMMON = ["--seq_len", 32, "--learning_rate", 1e-3, "--max_tokens", STEPS * 4 * 32, "--num_hidden_layers", 3,
          *TRAINING_LOOP]
LAYOUTS = {
    "baseline": (1, ["--micro_batch_size", 2, "--gradient_accumulation_steps", 2]),
    "tp2": (2, ["--micro_batch_size", 2, "--gradient_accumulation_steps", 2, "--tp_size", 2]),
    "dp2_bucket": (2, ["--micro_batch_size", 1, "--gradient_accumulation_steps", 2, "--dp_size", 2,
                       "--bucket_size_mb", 1]),
    "pp2_1f1b": (2, ["--micro_batch_size", 1, "--gradient_accumulation_steps", 4, "--pp_size", 2, "--pp_engine", "1f1b"]),
    "cp2_tp2": (4, ["--micro_batch_size", 2, "--gradient_accumulation_steps", 2, "--cp_size", 2, "--tp_size", 2]),
    "tp2_pp2": (4, ["--micro_batch_size", 2, "--gradient_accumulation_steps", 2, "--tp_size", 2, "--pp_size", 2,
                    "--pp_engine", "1f1b"]),
    "cp2_pp2": (4, ["--micro_batch_size", 2, "--gradient_accumulation_steps", 2, "--cp_size", 2, "--pp_size", 2,
                    "--pp_engine", "1f1b"]),
}
# cp 2 alone is not here: cp2_tp2 resumes its context-parallel split, and cp2_pp2 reshards into one
SAME_LAYOUT = ["baseline", "tp2", "dp2_bucket", "pp2_1f1b", "cp2_tp2"]
RESHARD = [("tp2_pp2", "baseline"), ("dp2_bucket", "tp2"), ("baseline", "cp2_pp2")]  # (saved in, resumed in)


def tree_digest(folder):
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            digest.update(path.relative_to(folder).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()


def error_lines(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith("error: ")]


def halfway_copy(save_dir, target):
    """save_dir as a run that stopped after step 3 left it: the step-6 checkpoint is not there yet."""
    shutil.copytree(save_dir, target, ignore=shutil.ignore_patterns(f"step_{STEPS:06d}"))
    return target


def current_umask():
    umask = os.umask(0)
    os.umask(umask)
    return umask


def launch_two_at_a_time(function, items):
    """Each launch is mostly interpreter start-up, which overlaps well."""
    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(function, items))


@pytest.fixture(scope="module")
def full_runs(torchrun, tmp_path_factory):
    """Every layout's uninterrupted 6 steps, saving at step 3 and 6: name -> (run, save_dir)."""
    def launch(name):
        nproc, args = LAYOUTS[name]
        save_dir = tmp_path_factory.mktemp(f"ckpt_{name}")
        return name, (torchrun("step10", nproc, *COMMON, *args, "--save_dir", save_dir, "--save_every", SAVE_AT),
                      save_dir)

    return launch_two_at_a_time(launch, LAYOUTS)


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
    return launch_two_at_a_time(launch, items)


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


def step10_loader(monkeypatch, model_dir, micro_batch_size, grad_acc):
    pgm, dataloader = import_step("step10", "process_group_manager", "dataloader")
    monkeypatch.setattr(pgm, "process_group_manager",
                        SimpleNamespace(dp_world_size=1, dp_rank=0, cp_world_size=1, global_rank=0))
    return dataloader.MicroBatchDataLoader(micro_batch_size=micro_batch_size, seq_len=32, grad_acc_steps=grad_acc,
                                           dataset_name=str(ROOT / "assets" / "tiny_stories"),
                                           tokenizer_name=str(model_dir), seed=42)


def transformers_loss(model, loader, grad_acc):
    """transformers' mean loss over the loader's next global batch."""
    losses = []
    with torch.no_grad():
        for _ in range(grad_acc):
            batch = next(loader)
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
            losses.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["target_ids"].reshape(-1)))
    return torch.stack(losses).mean().item()


def export_and_compare(save_dir, out_dir):
    """Export save_dir, load it with transformers, and compare its logits with our Llama holding the
    checkpoint's weights. Returns the transformers model."""
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "export_hf.py"), str(save_dir), str(out_dir)],
                          cwd=ROOT, env=run_env(out_dir.parent), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out_dir.iterdir()}
    hf_model = LlamaForCausalLM.from_pretrained(out_dir)

    # step 11's reader, which reads step 10's checkpoints too
    checkpoint, model_module = import_step("step11", "checkpoint", "model")
    checkpoint_dir = checkpoint.complete_checkpoints(str(save_dir))[-1]
    ours = model_module.Llama(LlamaConfig.from_dict(checkpoint.read_metadata(checkpoint_dir)["run"]["config"]))
    ours.load_hf_state_dict(checkpoint.read_full_tensors(checkpoint_dir, lambda key: key.startswith("model.")))
    input_ids = torch.randint(0, hf_model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        difference = (hf_model(input_ids).logits - ours(input_ids)).abs().max().item()
    print(f"export of {checkpoint_dir}: max |logits difference| {difference:.2e}")
    assert difference <= 1e-5
    return hf_model


def test_export_of_a_tp2_pp2_checkpoint_loads_in_transformers(full_runs, tmp_path, monkeypatch):
    full, save_dir = full_runs["tp2_pp2"]
    assert full.returncode == 0, full
    hf_model = export_and_compare(halfway_copy(save_dir, tmp_path / "ckpt"), tmp_path / "hf")
    assert hf_model.config.num_hidden_layers == 3 and not hf_model.config.tie_word_embeddings
    # transformers with the step-3 weights computes the loss the run logged at step 4, on the same data
    loader = step10_loader(monkeypatch, tmp_path / "hf", micro_batch_size=2, grad_acc=2)
    for _ in range(SAVE_AT * 2):
        next(loader)
    assert abs(transformers_loss(hf_model, loader, grad_acc=2) - full.losses[SAVE_AT]) <= 1e-5


def make_hf_checkpoint(folder, tied, shard):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ROOT / "assets" / "tiny_llama" / name, folder / name)
    config = LlamaConfig(vocab_size=4096, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
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


INIT_FROM_HF = {  # name: (nproc, layout, tied, sharded model files, step)
    "tp2_tied": (2, ["--tp_size", 2], True, True, "step10"),  # tied embeddings stay tied under tensor parallelism
    "pp2": (2, ["--pp_size", 2, "--pp_engine", "1f1b"], False, False, "step10"),
    # step 12 reads the files by slices, each rank its pieces of the (tied) units: the same global batch as above
    "step12_dp2_zero3_tied": (2, ["--micro_batch_size", 1, "--dp_size", 2, "--zero_stage", 3], True, True, "step12"),
}


@pytest.fixture(scope="module")
def init_from_hf_runs(torchrun, tmp_path_factory):
    """One step from transformers-made weights in each layout: name -> (run, transformers model, its dir, save_dir)."""
    def launch(name):
        nproc, layout, tied, shard, step = INIT_FROM_HF[name]
        model_dir, save_dir = tmp_path_factory.mktemp(f"hf_{name}"), tmp_path_factory.mktemp(f"ckpt_hf_{name}")
        model = make_hf_checkpoint(model_dir, tied=tied, shard=shard)
        run = torchrun(step, nproc, "--seq_len", 32, "--micro_batch_size", 2, "--gradient_accumulation_steps", 2,
                       "--max_tokens", 4 * 32, *layout, "--model_name", model_dir, "--init_from_hf", model_dir,
                       "--save_dir", save_dir)
        return name, (run, model, model_dir, save_dir)

    return launch_two_at_a_time(launch, INIT_FROM_HF)


@pytest.mark.parametrize("name", INIT_FROM_HF)
def test_init_from_hf_starts_at_transformers_loss(init_from_hf_runs, monkeypatch, name):
    run, model, model_dir, _ = init_from_hf_runs[name]
    assert run.returncode == 0, run
    sharded = (model_dir / "model.safetensors.index.json").exists()
    assert sharded == INIT_FROM_HF[name][3] and len(list(model_dir.glob("model*.safetensors"))) >= (3 if sharded else 1)
    expected = transformers_loss(model, step10_loader(monkeypatch, model_dir, micro_batch_size=2, grad_acc=2), 2)
    assert abs(expected - 8.32) > 0.5  # far from a fresh model's ln(4096): the weights must have been loaded
    assert abs(run.losses[0] - expected) <= 1e-5, (run.losses[0], expected)


def test_export_keeps_tied_embeddings_tied(init_from_hf_runs, tmp_path):
    run, _, _, save_dir = init_from_hf_runs["tp2_tied"]
    assert run.returncode == 0, run
    hf_model = export_and_compare(save_dir, tmp_path / "hf")
    assert hf_model.config.tie_word_embeddings
    assert hf_model.lm_head.weight.data_ptr() == hf_model.model.embed_tokens.weight.data_ptr()


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


def kill(pids, how=signal.SIGKILL):
    for member in pids:
        try:
            os.kill(member, how)
        except ProcessLookupError:
            pass


COMPLETE = "COMPLETE"


def checkpoint_files(save_dir):
    try:
        return [p.name for p in save_dir.glob("step_*/*")]
    except FileNotFoundError:  # the run pruned a folder while we looked
        return []


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_usable(tmp_path):
    """A wider model than the tiny one, so that a save (240 MB) lasts long enough to be interrupted."""
    model_dir, save_dir = tmp_path / "wide_model", tmp_path / "ckpt"
    model_dir.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ROOT / "assets" / "tiny_llama" / name, model_dir / name)
    LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=8,
                num_key_value_heads=4, max_position_embeddings=256).save_pretrained(model_dir)
    args = ["--model_name", model_dir, "--seq_len", 16, "--micro_batch_size", 1, "--gradient_accumulation_steps", 1,
            "--save_dir", save_dir, "--save_every", 1]
    proc = subprocess.Popen(torchrun_command("step10", 1, [*args, "--max_tokens", 16 * 500]), cwd=ROOT,
                            env=run_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    tree, killed_during_save = None, False
    deadline = time.time() + 240
    try:
        while time.time() < deadline and proc.poll() is None and not killed_during_save:
            files = checkpoint_files(save_dir)
            if COMPLETE in files:  # one checkpoint is complete; the worker is running
                tree = tree or process_tree(proc.pid)  # looked up once, so that the kill is immediate
                if any(name.endswith(".safetensors.tmp") for name in files):  # the next one is half-written
                    # Freeze the run, then look again: on a busy machine the save can finish (and write COMPLETE)
                    # between the look and the kill. Frozen, what is on disk is what the kill leaves.
                    kill(tree, signal.SIGSTOP)
                    if any(name.endswith(".safetensors.tmp") for name in checkpoint_files(save_dir)):
                        kill(tree)
                        killed_during_save = True
                    else:
                        kill(tree, signal.SIGCONT)  # the save ended meanwhile: catch the next one
            time.sleep(0.002)
    finally:
        kill(process_tree(proc.pid))
        proc.wait()
    assert killed_during_save, "never caught a save in progress"
    folders = sorted(save_dir.glob("step_*"))
    assert not (folders[-1] / "COMPLETE").exists(), [str(p.relative_to(save_dir)) for p in save_dir.rglob("*")]
    latest = int([d.name for d in folders if (d / "COMPLETE").exists()][-1][5:])

    resumed = subprocess.run(torchrun_command("step10", 1, [*args, "--max_tokens", 16 * (latest + 2), "--resume"]),
                             cwd=ROOT, env=run_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step {latest} " in resumed.stdout  # the interrupted save is skipped...
    assert not list(save_dir.rglob("*.tmp"))  # ...and its folder was written afresh when the run saved that step again
    assert [d.name for d in sorted(save_dir.glob("step_*"))] == [f"step_{latest + 1:06d}", f"step_{latest + 2:06d}"]


def train_py(tmp_path, *args):
    """train.py without torchrun: every refusal comes before the process group starts, and this starts twice as fast."""
    return subprocess.run([sys.executable, str(step_dir("step10") / "train.py"), *[str(a) for a in args]], cwd=ROOT,
                          env=run_env(tmp_path), capture_output=True, text=True, timeout=300)


REFUSALS = {  # case: what the one error line must say ({save_dir} and {pid} filled in)
    "another_run": ["is from another run", "seq_len 32 vs 64", "'name:roneneldan/TinyStories'", "seed 42 vs 7",
                    "num_hidden_layers 3 vs 2"],
    "another_global_batch": ["is from another run; checkpoint vs this run: global_batch_size 4 vs 2. Resume"],
    "fresh_run_into_a_used_dir": ["--save_dir {save_dir} is not empty (it holds step_000003, step_000006)",
                                  "--resume", "another --save_dir"],
    "dir_in_use": ["--save_dir {save_dir} is in use by another run (pid {pid})"],
    "keep_last_0": ["argument --keep_last: must be at least 1, got 0"],
    "unwritable_dir": ["cannot write to --save_dir {save_dir}: [Errno 20] Not a directory"],
    "truncated_newest": ["the newest checkpoint {save_dir}/step_000006 is damaged", "incomplete metadata",
                         "the newest intact one is {save_dir}/step_000003"],
    "missing_file_in_newest": ["{save_dir}/step_000006 is damaged", "pp00_tp01.safetensors",
                               "the newest intact one is {save_dir}/step_000003"],
    "nothing_to_resume": ["--resume: no complete checkpoint in --save_dir {save_dir}"],
}


@pytest.fixture(scope="module")
def refusals(full_runs, tmp_path_factory):
    """Each REFUSALS case tried in one process on a copy of a finished run's save_dir (or a bad path): case ->
    (process, save_dir, digest of the case's folder before, after)."""
    base = tmp_path_factory.mktemp("refusals")
    baseline = [*COMMON, *LAYOUTS["baseline"][1]]
    cases = {}
    for case in REFUSALS:
        save_dir = base / case / "ckpt"
        if case in ("unwritable_dir", "nothing_to_resume"):
            save_dir.mkdir(parents=True)
        else:  # tp2's checkpoints have two files; one process may resume them (the global batch is the same)
            shutil.copytree(full_runs["tp2" if case == "missing_file_in_newest" else "baseline"][1], save_dir)
        cases[case] = (save_dir, [*baseline, "--save_dir", save_dir, "--resume"])
    cases["another_run"][1].extend(["--seq_len", 64, "--dataset_name", "roneneldan/TinyStories", "--seed", 7,
                                    "--num_hidden_layers", 2])
    cases["another_global_batch"][1].extend(["--micro_batch_size", 1])
    cases["fresh_run_into_a_used_dir"][1].remove("--resume")
    cases["keep_last_0"][1].extend(["--keep_last", 0])
    not_a_dir = base / "unwritable_dir" / "a_file"  # unwritable even for root
    not_a_dir.write_text("")
    cases["unwritable_dir"] = (not_a_dir / "ckpt", [*baseline, "--save_dir", not_a_dir / "ckpt"])
    newest = cases["truncated_newest"][0] / "step_000006" / "pp00_tp00.safetensors"
    newest.write_bytes(newest.read_bytes()[:100_000])
    (cases["missing_file_in_newest"][0] / "step_000006" / "pp00_tp01.safetensors").unlink()
    # The test process holds the lock as a running training would (the same function, the same file).
    guards = import_step("step10", "save_dir")
    lock = guards.lock_save_dir(str(cases["dir_in_use"][0]))
    guards.sign_lock(lock)

    def launch(case):
        save_dir, args = cases[case]
        before = tree_digest(base / case)
        return case, (train_py(base, *args), save_dir, before, tree_digest(base / case))

    try:
        return launch_two_at_a_time(launch, REFUSALS)
    finally:
        lock.close()


@pytest.mark.parametrize("case", REFUSALS)
def test_a_run_that_would_lose_or_mix_up_another_is_refused_and_touches_nothing(refusals, case):
    proc, save_dir, before, after = refusals[case]
    assert proc.returncode != 0
    (error,) = error_lines(proc)
    for expected in REFUSALS[case]:
        assert expected.format(save_dir=save_dir, pid=os.getpid()) in error, error
    assert after == before
    assert "Step: " not in proc.stdout


CHECKPOINT_FLAGS = {"--save_dir", "--save_every", "--keep_last", "--resume", "--init_from_hf"}


@pytest.mark.parametrize("step", [f"step{n}" for n in range(1, 13)])
def test_checkpoints_are_the_technique_of_step_10_on(step, monkeypatch):
    train = import_step(step, "train")
    # train.parse_args() builds the parser and parses; made to hand back the parser, it shows every flag.
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", lambda parser, *args, **kwargs: parser)
    flags = {option for action in train.parse_args()._actions for option in action.option_strings}
    has_checkpoints = step in ("step10", "step11", "step12")
    assert (flags & CHECKPOINT_FLAGS == CHECKPOINT_FLAGS) if has_checkpoints else not flags & CHECKPOINT_FLAGS, \
        sorted(flags & CHECKPOINT_FLAGS)
    assert (step_dir(step) / "checkpoint.py").exists() == has_checkpoints


# Step 11: (layout, zero stage and dtype) -> launch arguments, each added to COMMON; saves at step 3 and 6.
ZERO_LAYOUTS = {
    "dp2_zero2": (2, [*LAYOUTS["dp2_bucket"][1], "--zero_stage", 2]),
    "bf16_dp2_zero1": (2, [*LAYOUTS["dp2_bucket"][1], "--zero_stage", 1, "--dtype", "bfloat16"]),
    "baseline": LAYOUTS["baseline"],
    "cp2_pp2_zero1": (4, [*LAYOUTS["cp2_pp2"][1], "--zero_stage", 1]),  # ZeRO-1 over the cp group of each stage
}


@pytest.fixture(scope="module")
def zero_runs(torchrun, full_runs, tmp_path_factory):
    """Step 11's uninterrupted runs that save, and its resumes from step 3: name or (saved in, resumed in) -> run
    (and save_dir for the uninterrupted ones). ("step10", "baseline") resumes step 10's baseline checkpoint."""
    def full(name):
        nproc, args = ZERO_LAYOUTS[name]
        save_dir = tmp_path_factory.mktemp(f"ckpt11_{name}")
        return name, (torchrun("step11", nproc, *COMMON, *args, "--save_dir", save_dir, "--save_every", SAVE_AT),
                      save_dir)

    saved = launch_two_at_a_time(full, ["dp2_zero2", "bf16_dp2_zero1"])
    saved["step10"] = full_runs["baseline"]

    def resume(pair):
        source, target = pair
        save_dir = halfway_copy(saved[source][1], tmp_path_factory.mktemp(f"resume11_{source}_{target}") / "ckpt")
        nproc, args = ZERO_LAYOUTS[target]
        return pair, torchrun("step11", nproc, *COMMON, *args, "--save_dir", save_dir, "--resume")

    resumed = launch_two_at_a_time(resume, [("dp2_zero2", "dp2_zero2"), ("bf16_dp2_zero1", "bf16_dp2_zero1"),
                                            ("dp2_zero2", "baseline"), ("dp2_zero2", "cp2_pp2_zero1"),
                                            ("step10", "baseline")])
    return {**saved, **resumed}


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
    from safetensors import safe_open
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


def test_export_of_a_zero_2_checkpoint_loads_in_transformers(zero_runs, tmp_path):
    full, save_dir = zero_runs["dp2_zero2"]
    assert full.returncode == 0, full
    export_and_compare(halfway_copy(save_dir, tmp_path / "ckpt"), tmp_path / "hf")


@pytest.mark.parametrize("step", ["step10", "step11", "step12"])
def test_checkpoints_sort_by_step_number_and_a_cut_short_prune_leaves_none_claiming_to_be_complete(
        step, tmp_path, monkeypatch):
    """step_1000000 is newer than step_999999 (their names sort the other way). Pruning takes each old checkpoint's
    COMPLETE away before its files: a prune interrupted inside rmtree leaves no checkpoint that claims to be whole."""
    checkpoint = import_step(step, "checkpoint")
    for number in (999_999, 1_000_000, 5, 1_000_001):
        folder = tmp_path / f"step_{number:06d}"
        folder.mkdir()
        (folder / "pp00_tp00.safetensors").write_bytes(b"weights")
        (folder / COMPLETE).write_text(f"{number}\n")
    (tmp_path / "step_000007").mkdir()  # no COMPLETE: a save that was cut short
    assert [os.path.basename(c) for c in checkpoint.complete_checkpoints(str(tmp_path))] == \
        ["step_000005", "step_999999", "step_1000000", "step_1000001"]

    def interrupted(path, *args, **kwargs):
        raise KeyboardInterrupt(f"stopped while deleting {path}")

    monkeypatch.setattr(checkpoint.shutil, "rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.prune(str(tmp_path), keep_last=2)
    assert not (tmp_path / "step_000005" / COMPLETE).exists()  # the one being deleted no longer claims anything
    monkeypatch.undo()
    checkpoint.prune(str(tmp_path), keep_last=2)
    assert [os.path.basename(c) for c in checkpoint.complete_checkpoints(str(tmp_path))] == \
        ["step_1000000", "step_1000001"]
    assert not (tmp_path / "step_999999").exists()
    assert not (tmp_path / "step_000007").exists()  # an orphan of a cut-short save, older than the newest: no use



@contextlib.contextmanager
def one_rank_run(step):
    """A tiny model after one optimizer step, in a process group of one (gloo) inside this process: yields
    (the step's checkpoint module, save(save_dir, step_number), the run's settings, the step's save_dir module
    with the guards), saving with the step's own save_checkpoint. A second or so, where a torchrun launch costs
    ten."""
    names = ("checkpoint", "save_dir", "process_group_manager", "model", *(("zero",) if step != "step10" else ()))
    checkpoint, guards, pgm, model_module, *zero = import_step(step, *names)
    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    config.head_dim = 8
    args = SimpleNamespace(seq_len=16, seed=1, micro_batch_size=1, gradient_accumulation_steps=1, dp_size=1,
                           learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=None, max_grad_norm=1.0,
                           weight_decay=0.1, dataset_name=str(ROOT / "assets" / "tiny_stories"),
                           model_name=str(ROOT / "assets" / "tiny_llama"))
    run = checkpoint.run_settings(args, config)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        pgm.setup_process_group_manager(1, 1, 1, 1)
        torch.manual_seed(0)
        model = model_module.Llama(config)
        if zero:
            model = zero[0].ZeroDataParallel(model, zero_stage=0)
            optimizer = zero[0].ZeroAdamW(model, lr=1e-3)
        else:
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        input_ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
        model(input_ids=input_ids, position_ids=torch.arange(16)[None]).float().logsumexp(-1).mean().backward()
        if zero:
            model.finish_gradient_synchronization()
        optimizer.step()
        data_loader = SimpleNamespace(state_dict=lambda: {"epoch": 0, "sequences_consumed": 0})

        def save(save_dir, number):
            checkpoint.save_checkpoint(save_dir=str(save_dir), step=number, tokens=16 * number, model=model,
                                       optimizer=optimizer, data_loader=data_loader, run=run, keep_last=2)

        yield checkpoint, save, run, guards
    finally:
        dist.destroy_process_group()


def rewrite(path, change):
    """Rewrite a checkpoint file after change(metadata, tensors) has edited them in place."""
    with safe_open(path, framework="pt") as f:
        metadata, tensors = json.loads(f.metadata()["json"]), {key: f.get_tensor(key) for key in f.keys()}
    change(metadata, tensors)
    path.unlink()
    save_file(tensors, path, metadata={"json": json.dumps(metadata)})


def flip_bytes(path):
    """8 bytes changed inside the last tensor's data, as a bad disk or a stray write would: the header still reads."""
    data = bytearray(path.read_bytes())
    data[-40:-32] = bytes(255 - b for b in data[-40:-32])
    path.write_bytes(bytes(data))


def second_file(step, checkpoint, folder, metadata):
    """Where a checkpoint of two files keeps its second, with the layout saying so (tp 2 in step 10's format,
    two ZeRO shards in step 11's)."""
    if step == "step10":
        metadata["layout"]["tp_size"] = 2
        return folder / os.path.basename(checkpoint.checkpoint_file(str(folder), 0, 1))
    metadata["layout"]["shards"] = 2
    return folder / os.path.basename(checkpoint.checkpoint_file(str(folder), 0, 0, 1))


@pytest.mark.parametrize("step", ["step10", "step11", "step12"])
def test_damaged_data_is_refused_naming_the_file_and_the_checkpoint(step, tmp_path, capsys):
    """Issue 22, item 3: bytes changed inside a tensor, a shard of an older step or of another save, a metadata key
    missing, non-finite values: each is one line naming the file, and --resume refuses before training, naming
    the newest intact checkpoint, touching nothing."""
    pristine = tmp_path / "pristine"
    with one_rank_run(step) as (checkpoint, save, run, guards):
        save(pristine, 2)
        save(pristine, 4)
    (name,) = [p.name for p in (pristine / "step_000004").glob("*.safetensors")]
    assert checkpoint.damage(str(pristine / "step_000004")) is None

    def another_save(folder):
        def split_in_two(metadata, tensors):
            second = second_file(step, checkpoint, folder, metadata)
            save_file(tensors, second, metadata={"json": json.dumps({**metadata, "save_id": "0123456789abcdef"})})
        rewrite(folder / name, split_in_two)

    def nan_saved_so(metadata, tensors):
        key = next(key for key in tensors if key.startswith("model."))
        tensors[key][0] = float("nan")
        metadata["sha256"] = checkpoint.tensors_sha256(tensors)

    cases = {  # how the newest checkpoint is damaged -> what damage() says
        "flipped": (lambda folder: flip_bytes(folder / name), "its tensors do not match their checksum"),
        "older_shard": (lambda folder: shutil.copy(pristine / "step_000002" / name, folder / name),
                        "it holds step 2, not 4"),
        "another_save": (another_save, "it is from another save of step 4"),
        "missing_key": (lambda folder: rewrite(folder / name, lambda metadata, _: metadata.pop("tokens")),
                        "its metadata lacks the key 'tokens'"),
        "missing_run_key": (lambda folder: rewrite(folder / name, lambda metadata, _: metadata["run"].pop("seq_len")),
                            "its metadata lacks the key 'run.seq_len'"),
        "not_finite": (lambda folder: rewrite(folder / name, nan_saved_so), "holds non-finite values"),
    }
    for case, (harm, expected) in cases.items():
        save_dir = tmp_path / case
        shutil.copytree(pristine, save_dir)
        harm(save_dir / "step_000004")
        problem = checkpoint.damage(str(save_dir / "step_000004"))
        assert problem and expected in problem and problem.split(":")[0].endswith(".safetensors"), (case, problem)
        before = tree_digest(save_dir)
        capsys.readouterr()
        with pytest.raises(SystemExit) as stop:
            guards.check_save_dir(str(save_dir), resume=True, run=run)
        assert stop.value.code != 0
        (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert f"the newest checkpoint {save_dir}/step_000004 is damaged ({problem})" in error, error
        assert f"the newest intact one is {save_dir}/step_000002" in error, error
        assert tree_digest(save_dir) == before


@pytest.mark.parametrize("step", ["step10", "step11", "step12"])
def test_resume_says_it_skips_a_cut_short_save_and_refuses_another_config_or_tokenizer(step, tmp_path, capsys):
    """The newest folder without COMPLETE is named; a checkpoint from a model whose config (rms_norm_eps, say) or
    tokenizer differs is refused naming them; a config that differs only in a name (`_name_or_path`) is not."""
    with one_rank_run(step) as (checkpoint, save, run, guards):
        save(tmp_path, 2)
    (tmp_path / "step_000003").mkdir()  # a save cut short
    capsys.readouterr()
    assert guards.check_save_dir(str(tmp_path), resume=True, run=run) == str(tmp_path / "step_000002")
    assert f"warning: --resume: {tmp_path}/step_000003 is skipped: it has no COMPLETE" in capsys.readouterr().err

    renamed = {**run, "config": {**run["config"], "_name_or_path": "/mnt/other/tiny_llama"}}
    assert guards.check_save_dir(str(tmp_path), resume=True, run=renamed) == str(tmp_path / "step_000002")
    changed = {**run, "tokenizer": "0" * 16, "config": {**run["config"], "rms_norm_eps": 1e-3}}
    with pytest.raises(SystemExit):
        guards.check_save_dir(str(tmp_path), resume=True, run=changed)
    (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert "is from another run" in error and f"tokenizer {run['tokenizer']!r} vs '{'0' * 16}'" in error, error
    assert f"config.rms_norm_eps {run['config']['rms_norm_eps']!r} vs 0.001" in error, error
    assert "_name_or_path" not in error, error


@pytest.mark.parametrize("step", ["step10", "step11", "step12"])
def test_a_save_reaches_the_disk_before_complete_and_a_full_disk_removes_the_partial_save(
        step, tmp_path, monkeypatch, capsys):
    """fsync each file before its rename, then the folder; COMPLETE after, itself fsynced, then the folder again.
    A write that fails for want of space is one line; the partial folder goes, the earlier checkpoint stays."""
    with one_rank_run(step) as (checkpoint, save, run, guards):
        events = []
        real_fsync, real_replace = checkpoint.fsync, os.replace
        monkeypatch.setattr(checkpoint, "fsync", lambda path: (events.append(("fsync", os.path.basename(path))),
                                                               real_fsync(path)))
        monkeypatch.setattr(checkpoint.os, "replace", lambda src, dst: (
            events.append(("rename", os.path.basename(src), os.path.basename(dst))), real_replace(src, dst)))
        save(tmp_path, 2)
        monkeypatch.undo()
        (name,) = [p.name for p in (tmp_path / "step_000002").glob("*.safetensors")]
        assert events[events.index(("fsync", name + ".tmp")):] == [
            ("fsync", name + ".tmp"), ("rename", name + ".tmp", name), ("fsync", "step_000002"),  # the file
            ("fsync", "step_000002"), ("rename", "COMPLETE.tmp", "COMPLETE"), ("fsync", "step_000002")], events
        # safetensors creates its files 0600; a checkpoint's files all take the mode the umask gives (issue 29)
        modes = {path.name: path.stat().st_mode & 0o777 for path in (tmp_path / "step_000002").iterdir()}
        assert modes == {name: 0o666 & ~current_umask(), "COMPLETE": 0o666 & ~current_umask()}, modes

        def disk_full(*args, **kwargs):
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

        monkeypatch.setattr(checkpoint, "save_file", disk_full)
        capsys.readouterr()
        with pytest.raises(SystemExit) as stop:
            save(tmp_path, 4)
    assert stop.value.code != 0
    (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert f"cannot save the checkpoint {tmp_path}/step_000004 (rank 0: " in error and "No space left" in error, error
    assert "partial folder was removed" in error
    assert not (tmp_path / "step_000004").exists()
    assert checkpoint.damage(str(tmp_path / "step_000002")) is None


@pytest.mark.parametrize("step", ["step10", "step11", "step12"])
def test_save_dir_guards_lock_first_write_to_prove_writable_and_name_a_file(step, tmp_path, monkeypatch, capsys):
    """The lock is taken before the checks (a run on a used directory another run holds is told it is in use);
    writability is proven by writing (an existing lock file opens for appending in a read-only directory);
    a --save_dir that is a file is said so; a filesystem without flock is a warning, not a traceback."""
    train, guards = import_step(step, "train", "save_dir")
    used = tmp_path / "used"
    (used / "step_000002").mkdir(parents=True)
    held = guards.lock_save_dir(str(used))
    monkeypatch.setattr(sys, "argv", ["train.py", "--save_dir", str(used)])
    with pytest.raises(SystemExit):
        train.main()  # a fresh run into a used directory that another run holds: the lock speaks first
    if dist.is_initialized():  # step 12: the guards are collectives (the checkpoint's files hashed once in all)
        dist.destroy_process_group()
    held.close()
    assert f"error: --save_dir {used} is in use by another run" in capsys.readouterr().err

    real_open = open

    def read_only_directory(path, mode="r", *args, **kwargs):  # existing files open, new ones cannot be created
        if any(flag in mode for flag in "wax") and not os.path.exists(path):
            raise PermissionError(30, "Read-only file system", path)
        return real_open(path, mode, *args, **kwargs)

    (tmp_path / "read_only" / guards.LOCK).parent.mkdir()
    (tmp_path / "read_only" / guards.LOCK).write_text("pid 1\n")
    monkeypatch.setattr(guards, "open", read_only_directory, raising=False)
    with pytest.raises(SystemExit):
        guards.lock_save_dir(str(tmp_path / "read_only"))
    assert f"error: cannot write to --save_dir {tmp_path / 'read_only'}: [Errno 30] Read-only file system" in \
        capsys.readouterr().err
    monkeypatch.undo()

    a_file = tmp_path / "a_file"
    a_file.write_text("")
    for guard in (lambda: guards.lock_save_dir(str(a_file)),
                  lambda: guards.check_save_dir(str(a_file), resume=False, run={})):
        with pytest.raises(SystemExit):
            guard()
        assert f"error: --save_dir {a_file} is a file, not a directory" in capsys.readouterr().err

    def no_flock(*args):
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(guards.fcntl, "flock", no_flock)
    guards.lock_save_dir(str(tmp_path / "nfs")).close()
    (warning,) = capsys.readouterr().err.splitlines()
    assert warning == f"warning: cannot lock --save_dir {tmp_path / 'nfs'} (Function not implemented): a second " \
                      f"run on it would not be refused"


@pytest.mark.parametrize("step", ["step10", "step11", "step12"])
def test_a_save_dir_that_a_rank_cannot_see_is_refused_naming_the_rank(step, tmp_path, monkeypatch, capsys):
    """Issue 22, item 2: a --save_dir path that names a local folder on each node. Here the one rank is made blind to
    the token file that global rank 0 writes; a rank that sees it passes, and the token is gone afterwards."""
    with one_rank_run(step) as (checkpoint, _, _, guards):
        guards.check_every_rank_sees(str(tmp_path))
        assert list(tmp_path.iterdir()) == []
        real_open = open

        def another_node(path, mode="r", *args, **kwargs):  # reads see that node's own, empty, directory
            if mode == "r" and os.path.basename(path) == guards.SEEN_BY_EVERY_RANK:
                raise FileNotFoundError(2, "No such file or directory", path)
            return real_open(path, mode, *args, **kwargs)

        monkeypatch.setattr(guards, "open", another_node, raising=False)
        capsys.readouterr()
        with pytest.raises(SystemExit):
            guards.check_every_rank_sees(str(tmp_path))
    (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert f"--save_dir {tmp_path} is not one directory that every rank sees: rank(s) 0 cannot read" in error, error
    assert list(tmp_path.iterdir()) == []


def check_on_two_nodes(train, utils, monkeypatch, rank_0_flags, rank_1_flags):
    """utils.check_same_settings as rank 0 runs it, when rank 1 (another node) was started with rank_1_flags: the
    gather hands rank 0 the settings that rank 1 computed from its own command line."""
    def settings_of(flags):
        monkeypatch.setattr(sys, "argv", ["train.py", *map(str, flags)])
        args = train.parse_args()
        return args, utils.load_config(args)

    def gather_alone(everyone, settings):
        everyone[0] = settings

    gathered = []
    monkeypatch.setattr(utils.dist, "get_world_size", lambda: len(gathered) + 1)
    monkeypatch.setattr(utils.dist, "all_gather_object", lambda everyone, settings: (
        gathered.append(settings), everyone.__setitem__(slice(None), gathered[::-1])))
    utils.check_same_settings(*settings_of(rank_1_flags))
    utils.check_same_settings(*settings_of(rank_0_flags))


@pytest.mark.parametrize("step", [f"step{n}" for n in range(2, 13)])
def test_ranks_compare_what_they_train_on_not_how_it_is_named(step, tmp_path, monkeypatch, capsys):
    """Issue 22, item 1, in every step that has the check (2 on): the model and dataset directories reached by
    another path (a symlink: another mount point on another node) and per-node output flags are the same run;
    another seed, or a tokenizer whose files differ, is not, and is one line naming it. Step 2 trains on random
    tokens: it has no --dataset_name, no output flags, and its model is compared by its config alone."""
    train, utils = import_step(step, "train", "utils")
    model_link, data_link = tmp_path / "model_link", tmp_path / "data_link"
    model_link.symlink_to(ROOT / "assets" / "tiny_llama")
    data_link.symlink_to(ROOT / "assets" / "tiny_stories")
    has_data = step != "step2"
    node_0 = ["--metrics_file", tmp_path / "node0.jsonl", "--run_name", "node0"] if has_data else []
    node_1 = ["--model_name", model_link, "--omp_num_threads", 2, "--timeout_s", 60]
    if has_data:
        node_1 += ["--dataset_name", data_link, "--metrics_file", tmp_path / "node1.jsonl", "--run_name", "node1",
                   "--num_workers", 2]
    same_weights = tmp_path / "same_weights"  # --init_from_hf (steps 10 on): a copy elsewhere is the same weights
    shutil.copytree(ROOT / "assets" / "tiny_llama", same_weights)
    has_weights = step in ("step10", "step11", "step12")
    if has_weights:
        node_0 += ["--init_from_hf", ROOT / "assets" / "tiny_llama"]
        node_1 += ["--init_from_hf", same_weights]
    check_on_two_nodes(train, utils, monkeypatch, node_0, node_1)

    other_tokenizer = tmp_path / "other_tokenizer"
    shutil.copytree(ROOT / "assets" / "tiny_llama", other_tokenizer)
    with open(other_tokenizer / "tokenizer_config.json", "a") as f:
        f.write("\n")
    other_config = tmp_path / "other_config"
    shutil.copytree(ROOT / "assets" / "tiny_llama", other_config)
    config = json.loads((other_config / "config.json").read_text())
    (other_config / "config.json").write_text(json.dumps({**config, "rope_theta": 1234.0}))
    refused = [(["--seed", 7], "--seed 42 on ranks [0], 7 on ranks [1]"),
               (["--model_name", other_config], "'rope_theta': 1234.0")]
    if has_data:
        refused.append((["--model_name", other_tokenizer], "the tokenizer files of --model_name '"))
    if has_weights:
        refused.append((["--init_from_hf", other_tokenizer], "the files of --init_from_hf '"))
    for flags, expected in refused:
        capsys.readouterr()
        with pytest.raises(SystemExit):
            check_on_two_nodes(train, utils, monkeypatch, node_0, [*node_1, *flags])
        (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert error.startswith("error: the ranks were started with different settings") and expected in error, error
        assert "metrics_file" not in error and "dataset_name" not in error and "config._name_or_path" not in error
        assert "omp_num_threads" not in error and "model_name" not in error.replace("tokenizer files of --model_name", "")


@pytest.mark.parametrize("step", ["step10", "step11", "step12"])
def test_a_resume_knows_its_dataset_by_content_not_by_path(step, tmp_path):
    """Issue 22, item 1, for --resume: the dataset copied to another path (another node's mount) is the same run;
    a dataset whose files differ by one byte is another run, named."""
    checkpoint = import_step(step, "checkpoint")
    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)

    def run_on(dataset):
        args = SimpleNamespace(seq_len=16, seed=1, micro_batch_size=1, gradient_accumulation_steps=1, dp_size=1,
                               learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=None, max_grad_norm=1.0,
                               weight_decay=0.1, dataset_name=str(dataset),
                               model_name=str(ROOT / "assets" / "tiny_llama"))
        return checkpoint.run_settings(args, config)

    saved = json.loads(json.dumps(run_on(ROOT / "assets" / "tiny_stories")))
    moved, edited = tmp_path / "moved", tmp_path / "edited"
    shutil.copytree(ROOT / "assets" / "tiny_stories", moved)
    shutil.copytree(ROOT / "assets" / "tiny_stories", edited)
    with open(edited / "README.md", "a") as f:
        f.write(" ")
    assert checkpoint.run_differences(saved, run_on(moved)) == []
    (difference,) = checkpoint.run_differences(saved, run_on(edited))
    assert difference.startswith(f"dataset {saved['dataset']!r} vs "), difference


@pytest.mark.parametrize("step", ["step1", "step11"])
def test_a_refusal_is_said_on_every_node(step, monkeypatch, capsys):
    """Issue 22, item 1: in a job of two torchrun agents, the first rank of the second node prints the line too (its
    agent shows only its own node's output); the other ranks of a node stay silent."""
    utils = import_step(step, "utils")
    monkeypatch.setattr(utils.time, "sleep", lambda seconds: None)
    for rank, local_rank, says in ((4, 0, True), (5, 1, False)):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(local_rank))
        with pytest.raises(SystemExit):
            utils.fail("--seed 1 on ranks [0, 1, 2, 3], 2 on ranks [4, 5, 6, 7]")
        assert capsys.readouterr().err == ("error: --seed 1 on ranks [0, 1, 2, 3], 2 on ranks [4, 5, 6, 7]\n" if says
                                           else "")
