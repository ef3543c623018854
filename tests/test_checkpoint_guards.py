"""Checkpoints, the guards of --save_dir and --resume: a run that would lose or mix up another is refused and touches
nothing; the lock comes first, writability is proven by writing, a file is named; a --save_dir that a rank cannot
see is refused; ranks compare what they train on, not how it is named, a resume knows its dataset by content, and a
refusal is said on every node; no checkpointing in the steps before 10."""
import argparse
import json
import os
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch.distributed as dist
from transformers import LlamaConfig

from checkpoint_helpers import one_rank_run, tree_digest
from checkpoint_runs import COMMON, LAYOUTS
from conftest import ROOT, concurrently, import_step, run_env, step_dir


def error_lines(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith("error: ")]


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
        return dict(concurrently(launch, REFUSALS))
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
    with one_rank_run(step) as (checkpoint, _, _, guards, _):
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


def check_on_two_nodes(train, utils, same_run, monkeypatch, rank_0_flags, rank_1_flags):
    """check_same_settings (same_run.py's from step 10 on, utils.py's before) as rank 0 runs it, when rank 1 (another node) was started with rank_1_flags: the
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
    same_run.check_same_settings(*settings_of(rank_1_flags))
    same_run.check_same_settings(*settings_of(rank_0_flags))


@pytest.mark.parametrize("step", [f"step{n}" for n in range(2, 13)])
def test_ranks_compare_what_they_train_on_not_how_it_is_named(step, tmp_path, monkeypatch, capsys):
    """Issue 22, item 1, in every step that has the check (2 on): the model and dataset directories reached by
    another path (a symlink: another mount point on another node) and per-node output flags are the same run;
    another seed, or a model config that differs, is not, and is one line naming it; from step 10 on (issue 30,
    item 7: where a run's identity matters) a tokenizer or --init_from_hf whose files differ is not either. Step 2
    trains on random tokens: it has no --dataset_name, no output flags, and its model is compared by its config
    alone."""
    has_weights = step in ("step10", "step11", "step12")
    train, utils, same_run = import_step(step, "train", "utils", "same_run" if has_weights else "utils")
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
    if has_weights:
        node_0 += ["--init_from_hf", ROOT / "assets" / "tiny_llama"]
        node_1 += ["--init_from_hf", same_weights]
    check_on_two_nodes(train, utils, same_run, monkeypatch, node_0, node_1)

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
    if has_weights:
        refused.append((["--model_name", other_tokenizer], "the tokenizer files of --model_name '"))
        refused.append((["--init_from_hf", other_tokenizer], "the files of --init_from_hf '"))
    for flags, expected in refused:
        capsys.readouterr()
        with pytest.raises(SystemExit):
            check_on_two_nodes(train, utils, same_run, monkeypatch, node_0, [*node_1, *flags])
        (error,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert error.startswith("error: the ranks were started with different settings") and expected in error, error
        assert "metrics_file" not in error and "dataset_name" not in error and "config._name_or_path" not in error
        assert "omp_num_threads" not in error and "model_name" not in error.replace("tokenizer files of --model_name", "")


@pytest.mark.parametrize("step", ["step10", "step11", "step12"])
def test_a_resume_knows_its_dataset_by_content_not_by_path(step, tmp_path):
    """Issue 22, item 1, for --resume: the dataset copied to another path (another node's mount) is the same run;
    a dataset whose files differ by one byte is another run, named."""
    same_run = import_step(step, "same_run")
    config = LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)

    def run_on(dataset):
        args = SimpleNamespace(seq_len=16, seed=1, micro_batch_size=1, gradient_accumulation_steps=1, dp_size=1,
                               learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=None, max_grad_norm=1.0,
                               weight_decay=0.1, dataset_name=str(dataset),
                               model_name=str(ROOT / "assets" / "tiny_llama"))
        return same_run.run_settings(args, config)

    saved = json.loads(json.dumps(run_on(ROOT / "assets" / "tiny_stories")))
    moved, edited = tmp_path / "moved", tmp_path / "edited"
    shutil.copytree(ROOT / "assets" / "tiny_stories", moved)
    shutil.copytree(ROOT / "assets" / "tiny_stories", edited)
    with open(edited / "README.md", "a") as f:
        f.write(" ")
    assert same_run.run_differences(saved, run_on(moved)) == []
    (difference,) = same_run.run_differences(saved, run_on(edited))
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
