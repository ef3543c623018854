"""Checkpoints on disk: a save reaches the disk before its COMPLETE, with the umask's modes, and a full disk
removes the partial save; a save killed with SIGKILL leaves the previous checkpoint usable; checkpoints sort by
step number, and a prune cut short leaves none claiming to be complete; damaged data is refused naming the file
and the checkpoint; --resume skips a cut-short save and refuses another config or tokenizer. Steps 10-12."""
import json
import os
import shutil
import signal
import subprocess
import time

import pytest
from transformers import LlamaConfig

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from checkpoint_helpers import one_rank_run, tree_digest
from conftest import ROOT, import_step, run_env, torchrun_command


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
    with one_rank_run(step) as (checkpoint, save, run, guards, durable):
        save(pristine, 2)
        save(pristine, 4)
    (name,) = [p.name for p in (pristine / "step_000004").glob("*.safetensors")]
    assert guards.damage(str(pristine / "step_000004")) is None

    def another_save(folder):
        def split_in_two(metadata, tensors):
            second = second_file(step, checkpoint, folder, metadata)
            save_file(tensors, second, metadata={"json": json.dumps({**metadata, "save_id": "0123456789abcdef"})})
        rewrite(folder / name, split_in_two)

    def nan_saved_so(metadata, tensors):
        key = next(key for key in tensors if key.startswith("model."))
        tensors[key][0] = float("nan")
        metadata["sha256"] = durable.tensors_sha256(tensors)

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
        problem = guards.damage(str(save_dir / "step_000004"))
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
    with one_rank_run(step) as (checkpoint, save, run, guards, durable):
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


def current_umask():
    umask = os.umask(0)
    os.umask(umask)
    return umask


@pytest.mark.parametrize("step", ["step10", "step11", "step12"])
def test_a_save_reaches_the_disk_before_complete_and_a_full_disk_removes_the_partial_save(
        step, tmp_path, monkeypatch, capsys):
    """fsync each file before its rename, then the folder; COMPLETE after, itself fsynced, then the folder again.
    A write that fails for want of space is one line; the partial folder goes, the earlier checkpoint stays."""
    with one_rank_run(step) as (checkpoint, save, run, guards, durable):
        events = []
        real_fsync, real_replace = durable.fsync, os.replace
        monkeypatch.setattr(durable, "fsync", lambda path: (events.append(("fsync", os.path.basename(path))),
                                                               real_fsync(path)))
        monkeypatch.setattr(durable.os, "replace", lambda src, dst: (
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

        monkeypatch.setattr(durable, "save_file", disk_full)
        capsys.readouterr()
        with pytest.raises(SystemExit) as stop:
            save(tmp_path, 4)
    assert stop.value.code != 0
    (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert f"cannot save the checkpoint {tmp_path}/step_000004 (rank 0: " in error and "No space left" in error, error
    assert "partial folder was removed" in error
    assert not (tmp_path / "step_000004").exists()
    assert guards.damage(str(tmp_path / "step_000002")) is None
