"""The guards of --save_dir: what keeps a run from losing or mixing up another one before anything is written.

    claim_save_dir        after init_distributed: global rank 0 locks the directory for the run (first: two runs
                          started together cannot both pass the checks), every rank sees the same directory (a
                          token file), every rank checks what is in it (the files of a checkpoint to resume from
                          hashed once in all, by the ranks in turn), rank 0 signs the lock

The checkpoint format they read (complete_checkpoints, read_metadata) is checkpoint.py's; the damage checks that a
resume runs first (file_damage, damage) are here, beside the other guards.
"""
import atexit
import contextlib
import fcntl
import json
import os
import secrets

import torch
import torch.distributed as dist
from safetensors import safe_open

import process_group_manager as pgm
from checkpoint import (METADATA_KEYS, checkpoint_files, complete_checkpoints, first_file, folder_step, read_metadata,
                        step_folders)
from durable import COMPLETE, tensors_sha256
from same_run import RUN_KEYS, SCHEDULE, run_differences
from utils import fail, warn

LOCK = ".lock"
SEEN_BY_EVERY_RANK = ".seen_by_every_rank"  # written by global rank 0 at start-up, read by every rank, removed


def claim_save_dir(save_dir, resume, run):
    """Lock (global rank 0), see (every rank), check (every rank, the same verdict), sign the lock (rank 0). Returns
    the checkpoint to resume from (None for a fresh run) and the lock, which lasts as long as the returned file stays
    open: keep it for the whole run (None on the other ranks). Collectives: after init_distributed."""
    lock = lock_save_dir(save_dir) if dist.get_rank() == 0 else None
    check_every_rank_sees(save_dir)
    resume_from = check_save_dir(save_dir, resume, run)
    if lock is not None:
        sign_lock(lock)
    return resume_from, lock


def save_dir_is_a_file(save_dir):
    if os.path.exists(save_dir) and not os.path.isdir(save_dir):
        fail(f"--save_dir {save_dir} is a file, not a directory: choose a directory")


def check_save_dir(save_dir, resume, run):
    """Refuse, before anything is written, a run that would lose or mix up another one. Every rank reads the
    same files and reaches the same verdict. Returns the checkpoint to resume from (None for a fresh run)."""
    save_dir_is_a_file(save_dir)
    used = sorted(n for n in os.listdir(save_dir) if not n.startswith(".")) if os.path.isdir(save_dir) else []
    if not resume:
        if used:
            fail(f"--save_dir {save_dir} is not empty (it holds {', '.join(used[:3])}{', ...' if len(used) > 3 else ''}): "
                 f"continue its run with --resume, or choose another --save_dir")
        return None
    checkpoints = complete_checkpoints(save_dir)
    if not checkpoints:
        fail(f"--resume: no complete checkpoint in --save_dir {save_dir}")
    newest = checkpoints[-1]
    cut_short = step_folders(save_dir)[-1]
    if cut_short != newest:
        warn(f"--resume: {cut_short} is skipped: it has no {COMPLETE} (a save cut short)")
    problem = damage(newest)
    if problem:
        # Refused rather than falling back: the older checkpoint would silently cost the steps since, and the
        # damage (a disk, a copy, a hand) deserves a look before this run saves over anything.
        intact = [c for c in checkpoints[:-1] if damage(c) is None]
        fail(f"--resume: the newest checkpoint {newest} is damaged ({problem}); " +
             (f"the newest intact one is {intact[-1]}: move {newest} out of --save_dir to resume from it"
              if intact else "no older checkpoint is intact"))
    saved = read_metadata(newest)
    differing = run_differences(saved["run"], run)
    if differing:
        fail(f"--resume: {newest} is from another run; checkpoint vs this run: {'; '.join(differing)}. "
             f"Resume with the checkpoint's settings, or start a fresh run in another --save_dir")
    for name in SCHEDULE:
        if name in saved["run"] and saved["run"][name] != run[name] and pgm.launch().rank == 0:
            print(f"--{name} {run[name]} replaces the checkpoint's {saved['run'][name]} from here on", flush=True)
    return newest


def lock_save_dir(save_dir):
    """Hold an exclusive lock on save_dir for as long as the returned file stays open (the operating system
    drops it when the process ends, even on SIGKILL), so a second run on the directory is refused instead of
    overwriting this one. Called before check_save_dir, so two runs started together cannot both pass it. Then
    writes, syncs and removes a file: the proof that save_dir is writable (opening the existing lock file
    proves nothing: it opens in a read-only directory)."""
    save_dir_is_a_file(save_dir)
    lock_path = os.path.join(save_dir, LOCK)
    created = [path for path in (save_dir, lock_path) if not os.path.exists(path)]
    try:
        os.makedirs(save_dir, exist_ok=True)
        lock = open(lock_path, "a+")
    except OSError as error:
        fail(f"cannot write to --save_dir {save_dir}: {error}")
    # Until sign_lock claims the directory, what the lock created goes again at exit: a refused run leaves nothing.
    atexit.register(remove_unclaimed, created)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        fail(f"--save_dir {save_dir} is in use by another run ({lock.read().strip() or 'pid unknown'}): "
             f"wait for it to end, or choose another --save_dir")
    except OSError as error:  # some network filesystems (NFS, Lustre mounts) have no flock
        warn(f"cannot lock --save_dir {save_dir} ({error.strerror or error}): a second run on it would not be refused")
    try:
        probe = os.path.join(save_dir, f".write_probe_{os.getpid()}")
        with open(probe, "w") as f:
            f.write("writable\n")
            os.fsync(f.fileno())
        os.remove(probe)
    except OSError as error:
        fail(f"cannot write to --save_dir {save_dir}: {error}")
    return lock


def check_every_rank_sees(save_dir):
    """--save_dir must be one directory that every rank sees: a path that names a local folder on each node would
    let every save "succeed" and a resume find the other nodes' files missing. Global rank 0 writes a random token
    there, every rank reads it back, and the verdicts are gathered, so every rank stops together. A collective:
    after init_distributed."""
    token_path = os.path.join(save_dir, SEEN_BY_EVERY_RANK)
    token = [secrets.token_hex(8)]
    dist.broadcast_object_list(token, src=0)
    if dist.get_rank() == 0:
        with open(token_path, "w") as f:
            f.write(token[0])
    dist.barrier()  # written, and closed: a network filesystem shows it to a reader that opens it from now on
    try:
        with open(token_path) as f:
            sees = f.read() == token[0]
    except OSError:
        sees = False
    verdicts = [None] * dist.get_world_size()
    dist.all_gather_object(verdicts, sees)
    if dist.get_rank() == 0:
        os.remove(token_path)
    blind = [rank for rank, sees in enumerate(verdicts) if not sees]
    if blind:
        fail(f"--save_dir {save_dir} is not one directory that every rank sees: rank(s) {', '.join(map(str, blind))} "
             f"cannot read the file global rank 0 wrote there (a path local to each node?): give a directory on a "
             f"filesystem that every node shares")


def remove_unclaimed(created):
    """What lock_save_dir created (the lock file, then the folder), where no run claimed it."""
    for path in reversed(created):
        with contextlib.suppress(OSError):
            if os.path.isdir(path):
                os.rmdir(path)  # only if empty
            else:
                os.remove(path)


def sign_lock(lock):
    """Write this run's pid into the lock, once the checks passed (a refused run leaves the file as it was)."""
    atexit.unregister(remove_unclaimed)
    lock.truncate(0)
    lock.write(f"pid {os.getpid()}\n")
    lock.flush()


def file_damage(path, step, save_id):
    """Why one file of the checkpoint of `step` cannot be trusted (None if it can): its metadata lacks a key, it
    belongs to another step or another save (save_id: the first file's), its bytes no longer match their
    checksum, or it holds values that are not finite."""
    with safe_open(path, framework="pt") as f:  # opening checks the header and that the file is as long as it says
        metadata = json.loads((f.metadata() or {}).get("json", "{}"))
        missing = [key for key in METADATA_KEYS if key not in metadata]
        missing += [f"run.{key}" for key in RUN_KEYS if key not in metadata.get("run", {})]
        if missing:
            return f"its metadata lacks the key {missing[0]!r}"
        if metadata["step"] != step:
            return f"it holds step {metadata['step']}, not {step}"
        if metadata["save_id"] != save_id:
            return f"it is from another save of step {step} than the checkpoint's first file"
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    if tensors_sha256(tensors) != metadata["sha256"]:
        return "its tensors do not match their checksum (bytes changed after the save)"
    not_finite = [key for key, tensor in tensors.items() if not torch.isfinite(tensor).all()]
    if not_finite:
        return f"{not_finite[0]} holds non-finite values (inf or NaN): it was saved so, or changed since"
    return None


def damage(checkpoint_dir):
    """Why the checkpoint cannot be trusted, naming the file (None if every file of its layout is there, opens,
    comes from this step and this save, and matches its checksum). Each file is read and hashed once in the job:
    by one rank (file i by rank i mod the world size) once the process group is up, by this process alone before.
    A collective then: the verdicts are gathered, so every rank reaches the same one."""
    ranks, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    path = first_file(checkpoint_dir)
    problem = None
    try:
        first = read_metadata(checkpoint_dir)
        if "layout" not in first:
            problem = f"{os.path.basename(path)}: its metadata lacks the key 'layout'"
        else:
            layout = first["layout"]
            paths = [path for pp_rank in range(layout["pp_size"]) for tp_rank in range(layout["tp_size"])
                     for path in checkpoint_files(checkpoint_dir, layout, pp_rank, tp_rank)]
            for path in paths[rank::ranks]:
                problem = file_damage(path, step=folder_step(checkpoint_dir), save_id=first.get("save_id"))
                if problem:
                    problem = f"{os.path.basename(path)}: {problem}"
                    break
    except Exception as error:  # a missing file, or safetensors' own error for a truncated or garbled one
        problem = f"{os.path.basename(path)}: {' '.join(str(error).split())}"
    if ranks > 1:
        problems = [None] * ranks
        dist.all_gather_object(problems, problem)
        problem = next((problem for problem in problems if problem), None)
    return problem
