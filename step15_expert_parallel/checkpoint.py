"""Checkpoints of a run split over the 4D grid and sharded by ZeRO: the format, save, resume in the same or
another layout and zero stage. The guards of --save_dir (and the damage checks) are in save_dir.py, the durable
writes and checksums in durable.py, the run's identity in same_run.py, the import of Hugging Face weights in
hf_weights.py.

On disk:

    save_dir/.lock                                        held by the run writing here (its pid inside)
    save_dir/step_000020/pp00_tp01_shard01.safetensors    stage 0, tensor shard 1, ZeRO shard 1: the fp32
                                                          master and AdamW state of the ranges that rank owns
    save_dir/step_000020/...                              one file per (stage, tensor shard, ZeRO shard)
    save_dir/step_000020/COMPLETE                         written once every file is in place

Every tensor is saved under its name in the full model (`model.layers.5.mlp.up_proj.weight`, the global
layer index whatever the stage) with its AdamW state beside it (`exp_avg.`, `exp_avg_sq.`, `step.` instead
of `model.`); `model.` holds the fp32 master, so a bf16 run resumes exactly. Under ZeRO-1/2/3 each rank of a
dp x cp group writes only the ranges of the flattened tensors it owns (no gather to one rank, nothing
written twice), as 1-D pieces; the metadata names each piece's range and its tensor's shape. At stage 0 the
dp rank 0, cp rank 0 copy writes whole tensors into shard 00, and each file's metadata says which dimension
tensor parallelism split each tensor along. Loading is the same in every layout, and reads only what the rank
keeps (SavedTensors): a block of a full tensor comes from the pieces, of the tensor shards, that hold its rows
and columns. So a checkpoint resumes in another layout and another zero stage (resharding), tools/export_hf.py
turns it into a Hugging Face model with the same reader (every block the whole tensor), and step 10's
checkpoints (one `pp00_tp01.safetensors` per tensor shard, whole tensors) are read the same way. The data position is saved as sequences consumed
in the epoch, which means the same thing whatever the split of the global batch.

Experts (step 15). Under expert parallelism a rank holds consecutive experts of each expert tensor: one range of
the flattened full tensor, which is where its pieces are saved (their ranges and shapes are the full tensor's), so
the reader needs nothing new and a checkpoint reshards across ep sizes. At stage 0 the first ep_size dp ranks write
(shards = ep_size), the others' experts being theirs; the dense tensors are in shard 0 only.

A file is written under a temporary name, fsynced and renamed, and a checkpoint counts only once COMPLETE
exists, written and fsynced after every file is on the disk: a run killed mid-save, or a machine losing
power, leaves the previous one usable. Each file's metadata carries the sha256 of its tensors, its step and
the id of its save; a resume checks them all before training, so bytes changed on the disk, a file from
another step or another save, or non-finite values are refused by name instead of trained on (each file hashed
by one rank, the verdicts gathered). Nothing after initialisation draws random numbers (no dropout; the data
order depends on the seed and the epoch only), so a resume is exact without saving any RNG state.
"""
import json
import math
import os
import re
import secrets
import shutil

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open

import process_group_manager as pgm
from durable import COMPLETE, fresh_folder, mark_complete, tensors_sha256, write_durably
from expert_parallel import expert_placement
from pipeline_parallel import global_name
from tensor_parallel import tp_split_of_model
from utils import fail
from weights import parameter_reader

# What every file's metadata holds, and its run settings; a checkpoint that lacks one is refused, naming it.
METADATA_KEYS = ("step", "tokens", "run", "data", "tp_split", "layout", "save_id", "sha256")


def checkpoint_file(checkpoint_dir, pp_rank, tp_rank, shard):
    return os.path.join(checkpoint_dir, f"pp{pp_rank:02d}_tp{tp_rank:02d}_shard{shard:02d}.safetensors")


def checkpoint_files(checkpoint_dir, layout, pp_rank, tp_rank):
    """The files holding one tensor shard of one pipeline stage (step 10's layout has no "shards": one file)."""
    if "shards" not in layout:
        return [os.path.join(checkpoint_dir, f"pp{pp_rank:02d}_tp{tp_rank:02d}.safetensors")]
    return [checkpoint_file(checkpoint_dir, pp_rank, tp_rank, shard) for shard in range(layout["shards"])]


def step_folders(save_dir):
    """The step_* folders in save_dir, complete or not, oldest first: by step number, not by name (step_1000000
    comes after step_999999)."""
    names = [n for n in os.listdir(save_dir) if re.fullmatch(r"step_\d+", n)] if os.path.isdir(save_dir) else []
    return [os.path.join(save_dir, n) for n in sorted(names, key=folder_step)]


def folder_step(checkpoint_dir):
    return int(os.path.basename(checkpoint_dir).removeprefix("step_"))


def complete_checkpoints(save_dir):
    """Finished checkpoint folders in save_dir, oldest first."""
    return [folder for folder in step_folders(save_dir) if os.path.exists(os.path.join(folder, COMPLETE))]


def prune(save_dir, keep_last):
    """Delete all but the newest keep_last complete checkpoints, each one's COMPLETE first: a prune cut short
    leaves a folder that no longer claims to be complete, never a half-deleted one that does. Folders without
    COMPLETE older than the newest complete one go too: saves cut short, that no resume will read."""
    complete = complete_checkpoints(save_dir)
    for old in complete[:-keep_last]:
        os.remove(os.path.join(old, COMPLETE))
        shutil.rmtree(old)
    for orphan in set(step_folders(save_dir)) - set(complete):
        if folder_step(orphan) < folder_step(complete[-1]):
            shutil.rmtree(orphan)


def first_file(checkpoint_dir):
    """The file of stage 0, tensor shard 0 (and ZeRO shard 0): step 10's name or step 11's."""
    first = sorted(n for n in os.listdir(checkpoint_dir) if n.startswith("pp00_tp00") and n.endswith(".safetensors"))
    return os.path.join(checkpoint_dir, first[0] if first else "pp00_tp00_shard00.safetensors")


def read_metadata(checkpoint_dir):
    with safe_open(first_file(checkpoint_dir), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("json", "{}"))


def save_checkpoint(save_dir, step, tokens, model, optimizer, data_loader, run, keep_last):
    """Every rank that owns a piece of the optimizer writes its file (at stage 0 only the dp rank 0, cp rank 0
    copy of every (stage, tensor shard)); global rank 0 then marks the checkpoint complete and prunes. A rank
    that cannot write (a full disk) stops every rank with one line, and the partial folder is removed."""
    grid = pgm.process_group_manager
    checkpoint_dir = os.path.join(save_dir, f"step_{step:06d}")
    # One random id per save, from global rank 0, in every file: a file left from another save of this step is told
    # apart. Drawn from the operating system, so the training's random streams stay untouched.
    save_id = [secrets.token_hex(8)]
    dist.broadcast_object_list(save_id, src=0)
    problem = attempt(fresh_folder, checkpoint_dir) if grid.global_rank == 0 else None
    all_succeeded(problem, checkpoint_dir)  # the folder exists, and is empty

    sharded = model.stage.shards_optimizer_state and grid.cp_dp_world_size > 1
    # stage 0: the dp rank 0, cp rank 0 copy, and under expert parallelism the other experts of its ep group
    shards = grid.cp_dp_world_size if sharded else grid.ep_world_size
    shard = dist.get_rank(grid.cp_dp_group) if sharded else grid.dp_rank
    problem = None
    if sharded or (grid.dp_rank < grid.ep_world_size and grid.cp_rank == 0):
        layer_ids = getattr(model.module, "layer_ids", None)  # a pipeline stage's layers: their global indices
        placement = expert_placement(model.module)  # {expert tensor: (its first element, the full shape)}
        model_tp_split = tp_split_of_model(model)
        local_names = {param: local_name for local_name, param in model.named_parameters()}
        tensors, tp_split, ranges = {}, {}, {}
        for bucket in model.buckets:
            exp_avg, exp_avg_sq, adam_step = optimizer.owned_state(bucket)
            for param, start, end, piece in bucket.owned_pieces():
                if shard > 0 and not sharded and param not in placement:
                    continue  # dense: shard 0 writes it
                local_name = local_names[param]
                name = global_name(local_name, layer_ids)
                offset, shape = placement.get(param, (0, param.shape))
                # [end - start]: a range of the flattened tensor (this rank's tensor shard of it)
                tensors.update({f"model.{name}": bucket.master[piece], f"exp_avg.{name}": exp_avg[piece],
                                f"exp_avg_sq.{name}": exp_avg_sq[piece], f"step.{name}": adam_step})
                ranges[name] = [start + offset, end + offset, list(shape)]
                if local_name in model_tp_split:  # the AdamW moments are split as their parameter; step is a scalar
                    for kind in ("model", "exp_avg", "exp_avg_sq"):
                        tp_split[f"{kind}.{name}"] = model_tp_split[local_name]
        # copies: safetensors refuses tensors that share memory (pieces of one flat buffer, the one step counter)
        tensors = {key: t.detach().to("cpu", copy=True) for key, t in tensors.items()}
        metadata = {"step": step, "tokens": tokens, "run": run, "data": data_loader.state_dict(), "tp_split": tp_split,
                    "ranges": ranges, "zero_stage": model.zero_stage, "save_id": save_id[0],
                    "sha256": tensors_sha256(tensors),
                    "layout": {"tp_size": grid.tp_world_size, "cp_size": grid.cp_world_size,
                               "pp_size": grid.pp_world_size, "dp_size": grid.dp_world_size, "shards": shards}}
        problem = attempt(write_durably, checkpoint_file(checkpoint_dir, grid.pp_rank, grid.tp_rank, shard),
                          tensors, metadata)
    all_succeeded(problem, checkpoint_dir)  # every file is in place, on the disk

    problem = attempt(mark_complete, checkpoint_dir, step) if grid.global_rank == 0 else None
    all_succeeded(problem, checkpoint_dir)
    if grid.global_rank == 0:
        prune(save_dir, keep_last)
    dist.barrier()  # no rank races ahead to a next save while rank 0 prunes


def attempt(write, *args):
    """None if write(*args) succeeds, else why not (a full disk, a vanished mount) as one line."""
    try:
        write(*args)
    except (OSError, SafetensorError) as error:  # safetensors reports a failed write as its own error
        return " ".join(str(error).split())
    return None


def all_succeeded(problem, checkpoint_dir):
    """A collective: every rank learns whether any rank failed to write; if one did, global rank 0 removes the
    partial folder and every rank stops, so no run trains on without the checkpoint it asked for."""
    problems = [None] * dist.get_world_size()
    dist.all_gather_object(problems, problem)
    failed = {rank: problem for rank, problem in enumerate(problems) if problem}
    if failed:
        if dist.get_rank() == 0:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)
        rank, problem = next(iter(failed.items()))
        fail(f"cannot save the checkpoint {checkpoint_dir} (rank {rank}: {problem}): its partial folder was removed, "
             f"the earlier checkpoints are intact")


class SavedTensors:
    """A checkpoint as a source of weights.py: where each tensor lies (the 1-D pieces of each tensor shard, in
    which file), read by blocks. A block is read from the pieces that hold its rows, of the tensor shards that hold
    its columns, and nothing else: a rank resuming in the layout of the save reads the bytes it owns (whole rows of
    them), in another layout the rows that hold its share. Keys are the files': `model.<name>`, `exp_avg.<name>`,
    `exp_avg_sq.<name>`, `step.<name>` (read_scalar). Step 10's files (whole tensors) are read the same way."""

    def __init__(self, checkpoint_dir):
        layout = read_metadata(checkpoint_dir)["layout"]
        self.tp_size = layout["tp_size"]
        self.pieces = {}  # key -> {tp rank: [(start, end, path)]}: ranges of the flattened tensor shard
        self.files = {}  # path -> the open file (safetensors reads a slice from the disk when asked for it)
        self.shard_shapes, self.tp_split = {}, {}
        for pp_rank in range(layout["pp_size"]):
            for tp_rank in range(layout["tp_size"]):
                for path in checkpoint_files(checkpoint_dir, layout, pp_rank, tp_rank):
                    file = self.files[path] = safe_open(path, framework="pt")  # only the header is read here
                    metadata = json.loads(file.metadata()["json"])
                    self.tp_split.update(metadata["tp_split"])
                    for key in file.keys():
                        shape = file.get_slice(key).get_shape()  # a 1-D piece's, or a whole tensor's (step 10)
                        if key.startswith("step."):  # AdamW's step count: a scalar
                            start, end = 0, 1
                        else:
                            start, end, shape = metadata.get("ranges", {}).get(key.split(".", 1)[1],
                                                                                (0, torch.Size(shape).numel(), shape))
                        self.pieces.setdefault(key, {}).setdefault(tp_rank, []).append((start, end, path))
                        self.shard_shapes[key] = shape
        for shards in self.pieces.values():
            for pieces in shards.values():
                pieces.sort(key=lambda piece: piece[0])

    def keys(self):
        return self.pieces.keys()

    def shape(self, key):
        shape = list(self.shard_shapes[key])
        if key in self.tp_split:
            shape[self.tp_split[key]] *= self.tp_size  # the tensor shards side by side
        return shape

    def read_scalar(self, key):
        return self.files[next(iter(self.pieces[key].values()))[0][2]].get_tensor(key)

    def read_block(self, key, rows, cols):
        dim = self.tp_split.get(key)
        shard_shape = self.shard_shapes[key]
        height, width = shard_shape[0], math.prod(shard_shape[1:])  # a 3-D tensor (experts) as [E, the rest]
        block = torch.empty(rows[1] - rows[0], cols[1] - cols[0])
        for tp_rank, pieces in sorted(self.pieces[key].items()):
            if dim is None and tp_rank > 0:
                break  # unsplit: every tensor shard holds the same copy
            top, left = (tp_rank * height, 0) if dim == 0 else (0, tp_rank * width) if dim == 1 else (0, 0)
            first, last = max(rows[0], top), min(rows[1], top + height)  # the rows of the block in this shard
            lo, hi = max(cols[0], left), min(cols[1], left + width)  # and its columns
            if first < last and lo < hi:
                flat = self.read_flat(key, pieces, (first - top) * width, (last - top) * width)
                block[first - rows[0]:last - rows[0], lo - cols[0]:hi - cols[0]] = \
                    flat.view(last - first, width)[:, lo - left:hi - left]
        return block

    def read_flat(self, key, pieces, start, end):
        """Elements [start, end) of a flattened tensor shard, from the pieces that overlap them."""
        parts = [self.files[path].get_slice(key)[max(start, first) - first:min(end, last) - first].reshape(-1)
                 for first, last, path in pieces if first < end and last > start]
        return torch.cat(parts)


def read_full_tensors(checkpoint_dir, wanted):
    """{key: full tensor} for the keys of the checkpoint that wanted(key) selects (tools/export_hf.py, the tests):
    every block is the whole tensor."""
    saved = SavedTensors(checkpoint_dir)
    full = {}
    for key in filter(wanted, saved.keys()):
        shape = saved.shape(key)
        if key.startswith("step."):
            full[key] = saved.read_scalar(key)
        else:
            full[key] = saved.read_block(key, (0, shape[0]), (0, math.prod(shape[1:]))).view(shape)
    return full


def load_checkpoint(checkpoint_dir, model, optimizer, data_loader):
    """Give this rank its part of a checkpoint saved in any layout and zero stage, reading only that: what it keeps
    of every weight (the fp32 master, cast to the compute dtype), the fp32 master and AdamW state of the pieces it
    owns; and the data position. Returns (step, tokens)."""
    metadata = read_metadata(checkpoint_dir)
    saved = SavedTensors(checkpoint_dir)
    model.load_parameters(parameter_reader(saved, model, key=lambda name: f"model.{name}"), exact_master=True)
    moments = {kind: parameter_reader(saved, model, key=lambda name, kind=kind: f"{kind}.{name}")
               for kind in ("exp_avg", "exp_avg_sq")}
    local_names = {param: name for name, param in model.module.named_parameters()}
    layer_ids = getattr(model.module, "layer_ids", None)
    for bucket in model.buckets:
        flat = {kind: torch.zeros_like(bucket.master) for kind in moments}  # the owned piece's, padding zeros
        step = None
        for param, start, end, piece in bucket.owned_pieces():
            name = local_names[param]
            for kind, read in moments.items():
                flat[kind][piece] = read(name, start, end)
            # a float32 CPU scalar, as AdamW keeps it; the same for every tensor
            step = saved.read_scalar(f"step.{global_name(name, layer_ids)}")
        if step is not None:
            optimizer.load_owned_state(bucket, exp_avg=flat["exp_avg"], exp_avg_sq=flat["exp_avg_sq"], step=step)
    data_loader.load_state_dict(metadata["data"])
    return metadata["step"], metadata["tokens"]
