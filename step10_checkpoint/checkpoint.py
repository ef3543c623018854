"""Checkpoints of a run split over the 4D grid: save, resume in the same or another layout, start from
Hugging Face Llama weights.

On disk:

    save_dir/.lock                                held by the run writing here (its pid inside)
    save_dir/step_000020/pp00_tp01.safetensors    pipeline stage 0, tensor shard 1: weights + AdamW state
    save_dir/step_000020/...                      one file per (stage, shard): dp and cp ranks hold copies
    save_dir/step_000020/COMPLETE                 written once every file is in place

Every tensor is saved under its name in the full model (`model.layers.5.mlp.up_proj.weight`, the global
layer index whatever the stage) with its AdamW state beside it (`exp_avg.`, `exp_avg_sq.`, `step.` instead
of `model.`), and each file's metadata says which dimension tensor parallelism split each tensor along.
Loading is the same in every layout: assemble a full tensor from the files that hold pieces of it, then
keep this rank's slice. So a checkpoint resumes in another layout (resharding), and tools/export_hf.py
turns it into a Hugging Face model with the same assembly. The data position is saved as sequences
consumed in the epoch, which means the same thing whatever the split of the global batch.

A file is written under a temporary name and renamed, and a checkpoint counts only once COMPLETE exists,
so a run killed mid-save leaves the previous one usable. Nothing after initialisation draws random
numbers (no dropout; the data order depends on the seed and the epoch only), so a resume is exact
without saving any RNG state.
"""
import fcntl
import json
import os
import re
import shutil

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import process_group_manager as pgm
from pipeline_parallel import stage_layer_range
from tensor_parallel import ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding
from utils import fail

COMPLETE = "COMPLETE"
LOCK = ".lock"
ARCHITECTURE = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "tie_word_embeddings")
# A resume must match all of these: otherwise the weights or the data position would mean something else.
SAME_RUN = ("seq_len", "global_batch_size", "dataset_name", "seed", *ARCHITECTURE)


def run_settings(args, config):
    """What identifies this run (SAME_RUN), the learning rate, and what an export needs (config, tokenizer)."""
    def where(name):  # a local directory by its real path, however it was spelled
        return os.path.realpath(name) if os.path.isdir(name) else name

    return {"seq_len": args.seq_len, "seed": args.seed, "dataset_name": where(args.dataset_name),
            "global_batch_size": args.micro_batch_size * args.gradient_accumulation_steps * args.dp_size,
            **{name: getattr(config, name) for name in ARCHITECTURE},
            "learning_rate": args.learning_rate, "model_name": where(args.model_name), "config": config.to_dict()}


def checkpoint_file(checkpoint_dir, pp_rank, tp_rank):
    return os.path.join(checkpoint_dir, f"pp{pp_rank:02d}_tp{tp_rank:02d}.safetensors")


def complete_checkpoints(save_dir):
    """Finished checkpoint folders in save_dir, oldest first: by step number, not by name (step_1000000 comes
    after step_999999)."""
    names = [n for n in os.listdir(save_dir) if re.fullmatch(r"step_\d+", n)] if os.path.isdir(save_dir) else []
    names.sort(key=lambda name: int(name.removeprefix("step_")))
    return [os.path.join(save_dir, n) for n in names if os.path.exists(os.path.join(save_dir, n, COMPLETE))]


def prune(save_dir, keep_last):
    """Delete all but the newest keep_last complete checkpoints, each one's COMPLETE first: a prune cut short
    leaves a folder that no longer claims to be complete, never a half-deleted one that does."""
    for old in complete_checkpoints(save_dir)[:-keep_last]:
        os.remove(os.path.join(old, COMPLETE))
        shutil.rmtree(old)


def read_metadata(checkpoint_dir):
    with safe_open(checkpoint_file(checkpoint_dir, 0, 0), framework="pt") as f:
        return json.loads(f.metadata()["json"])


def damage(checkpoint_dir):
    """Why the checkpoint cannot be read (None if every file of its layout is there and opens)."""
    try:
        layout = read_metadata(checkpoint_dir)["layout"]
        for pp_rank in range(layout["pp_size"]):
            for tp_rank in range(layout["tp_size"]):
                with safe_open(checkpoint_file(checkpoint_dir, pp_rank, tp_rank), framework="pt"):
                    pass  # opening checks the header and that the file is as long as it says
    except Exception as error:  # a missing file, or safetensors' own error for a truncated or garbled one
        return " ".join(str(error).split())
    return None


def check_save_dir(save_dir, resume, run):
    """Refuse, before anything is written, a run that would lose or mix up another one. Every rank reads the
    same files and reaches the same verdict. Returns the checkpoint to resume from (None for a fresh run)."""
    used = sorted(set(os.listdir(save_dir)) - {LOCK}) if os.path.isdir(save_dir) else []
    if not resume:
        if used:
            fail(f"--save_dir {save_dir} is not empty (it holds {', '.join(used[:3])}{', ...' if len(used) > 3 else ''}): "
                 f"continue its run with --resume, or choose another --save_dir")
        return None
    checkpoints = complete_checkpoints(save_dir)
    if not checkpoints:
        fail(f"--resume: no complete checkpoint in --save_dir {save_dir}")
    newest = checkpoints[-1]
    problem = damage(newest)
    if problem:
        intact = [c for c in checkpoints[:-1] if damage(c) is None]
        fail(f"--resume: the newest checkpoint {newest} is damaged ({problem}); " +
             (f"the newest intact one is {intact[-1]}: move {newest} out of --save_dir to resume from it"
              if intact else "no older checkpoint is intact"))
    saved = read_metadata(newest)["run"]
    differing = [f"{name} {saved[name]!r} vs {run[name]!r}" for name in SAME_RUN if saved[name] != run[name]]
    if differing:
        fail(f"--resume: {newest} is from another run; checkpoint vs this run: {'; '.join(differing)}. "
             f"Resume with the checkpoint's settings, or start a fresh run in another --save_dir")
    if saved["learning_rate"] != run["learning_rate"] and int(os.environ.get("RANK", "0")) == 0:
        print(f"--learning_rate {run['learning_rate']} replaces the checkpoint's {saved['learning_rate']} "
              f"from here on", flush=True)
    return newest


def lock_save_dir(save_dir):
    """Hold an exclusive lock on save_dir for as long as the returned file stays open (the operating system
    drops it when the process ends, even on SIGKILL), so a second run on the directory is refused instead of
    overwriting this one. Creating the lock file also proves save_dir writable before training starts."""
    try:
        os.makedirs(save_dir, exist_ok=True)
        lock = open(os.path.join(save_dir, LOCK), "a+")
    except OSError as error:
        fail(f"cannot write to --save_dir {save_dir}: {error}")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        fail(f"--save_dir {save_dir} is in use by another run ({lock.read().strip() or 'pid unknown'}): "
             f"wait for it to end, or choose another --save_dir")
    lock.truncate(0)
    lock.write(f"pid {os.getpid()}\n")
    lock.flush()
    return lock


def global_name(local_name, first_layer):
    """A rank's parameter name -> its name in the full model: without the data-parallel wrapper's `module.`,
    with the global index of a stage's layer (`module.layers.1.mlp.up_proj.weight` on a stage whose
    first layer is 2 -> `layers.3.mlp.up_proj.weight`)."""
    name = local_name.removeprefix("module.")
    if name.startswith("layers."):
        _, index, rest = name.split(".", 2)
        name = f"layers.{int(index) + first_layer}.{rest}"
    return name


def tp_split_dims(model):
    """Local parameter name -> the dimension tensor_parallel.py split it along (unsplit ones are absent):
    column-parallel layers and the embedding by rows (output features, vocabulary), row-parallel by columns."""
    dims = {}
    for prefix, module in model.named_modules():
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
            dims[f"{prefix}.weight"] = dims[f"{prefix}.bias"] = 0
        elif isinstance(module, RowParallelLinear):
            dims[f"{prefix}.weight"] = 1  # its bias is added after the all-reduce: whole on every rank
    return dims


def save_checkpoint(save_dir, step, tokens, model, optimizer, data_loader, run, keep_last):
    """The dp rank 0, cp rank 0 copy of every (stage, shard) writes its file; global rank 0 then marks the
    checkpoint complete and prunes the old ones."""
    grid = pgm.process_group_manager
    checkpoint_dir = os.path.join(save_dir, f"step_{step:06d}")
    if grid.global_rank == 0:
        shutil.rmtree(checkpoint_dir, ignore_errors=True)  # left behind by a save killed before COMPLETE
        os.makedirs(checkpoint_dir)
    dist.barrier()  # the folder exists, and is empty

    if grid.dp_rank == 0 and grid.cp_rank == 0:
        first_layer = stage_layer_range(run["num_hidden_layers"], grid.pp_world_size, grid.pp_rank)[0]
        split_dims = tp_split_dims(model)
        tensors, tp_split = {}, {}
        # named_parameters lists a tied weight once (as embed_tokens.weight), in the optimizer's order.
        for local_name, param in model.named_parameters():
            name = global_name(local_name, first_layer)
            state = optimizer.state[param]
            tensors.update({f"model.{name}": param.detach(), f"exp_avg.{name}": state["exp_avg"],
                            f"exp_avg_sq.{name}": state["exp_avg_sq"], f"step.{name}": state["step"]})
            if local_name in split_dims:  # the AdamW moments are split as their parameter; step is a scalar
                for kind in ("model", "exp_avg", "exp_avg_sq"):
                    tp_split[f"{kind}.{name}"] = split_dims[local_name]
        metadata = {"step": step, "tokens": tokens, "run": run, "data": data_loader.state_dict(), "tp_split": tp_split,
                    "layout": {"tp_size": grid.tp_world_size, "cp_size": grid.cp_world_size,
                               "pp_size": grid.pp_world_size, "dp_size": grid.dp_world_size}}
        path = checkpoint_file(checkpoint_dir, grid.pp_rank, grid.tp_rank)
        save_file({key: t.cpu().contiguous() for key, t in tensors.items()}, path + ".tmp",
                  metadata={"json": json.dumps(metadata)})
        os.replace(path + ".tmp", path)  # atomic: a reader sees no file or the whole file

    dist.barrier()  # every file is in place
    if grid.global_rank == 0:
        marker = os.path.join(checkpoint_dir, COMPLETE)
        with open(marker + ".tmp", "w") as f:
            f.write(f"{step}\n")
        os.replace(marker + ".tmp", marker)
        prune(save_dir, keep_last)
    dist.barrier()  # no rank races ahead to a next save while rank 0 prunes


def read_full_tensors(checkpoint_dir, wanted):
    """{key: full tensor} for the keys of the checkpoint that wanted(key) selects, each assembled from the files
    holding its tensor-parallel pieces (concatenated in tp rank order along the dimension they were split)."""
    layout = read_metadata(checkpoint_dir)["layout"]
    pieces, tp_split = {}, {}
    for pp_rank in range(layout["pp_size"]):
        for tp_rank in range(layout["tp_size"]):
            with safe_open(checkpoint_file(checkpoint_dir, pp_rank, tp_rank), framework="pt") as f:
                tp_split.update(json.loads(f.metadata()["json"])["tp_split"])
                for key in filter(wanted, f.keys()):
                    pieces.setdefault(key, []).append(f.get_tensor(key))
    full = {}
    for key, tensors in pieces.items():
        dim = tp_split.get(key)
        full[key] = tensors[0] if dim is None else torch.cat(tensors, dim=dim)  # unsplit: every shard has a copy
    return full


def load_checkpoint(checkpoint_dir, model, optimizer, data_loader):
    """Give this rank its part of a checkpoint saved in any layout: its slice of the weights and of the AdamW
    state, and the data position. Returns (step, tokens)."""
    grid = pgm.process_group_manager
    metadata = read_metadata(checkpoint_dir)
    first_layer = stage_layer_range(metadata["run"]["num_hidden_layers"], grid.pp_world_size, grid.pp_rank)[0]
    names = {local_name: global_name(local_name, first_layer) for local_name, _ in model.named_parameters()}
    needed = set(names.values())
    full = read_full_tensors(checkpoint_dir, lambda key: key.split(".", 1)[1] in needed)
    split_dims = tp_split_dims(model)

    def this_rank_slice(key, local_name):
        # the same contiguous block that tensor_parallel.local_range keeps: [..., size, ...] -> [..., size / tp, ...]
        tensor = full[key]
        if local_name in split_dims:
            tensor = tensor.chunk(grid.tp_world_size, dim=split_dims[local_name])[grid.tp_rank]
        return tensor.contiguous()

    for local_name, param in model.named_parameters():
        name = names[local_name]
        with torch.no_grad():
            param.copy_(this_rank_slice(f"model.{name}", local_name))
        optimizer.state[param] = {"step": full[f"step.{name}"],  # a float32 CPU scalar, as AdamW keeps it
                                  "exp_avg": this_rank_slice(f"exp_avg.{name}", local_name).to(param),
                                  "exp_avg_sq": this_rank_slice(f"exp_avg_sq.{name}", local_name).to(param)}
    data_loader.load_state_dict(metadata["data"])
    return metadata["step"], metadata["tokens"]


def load_hf_weights(model, directory):
    """Load a Hugging Face Llama checkpoint (model.safetensors, or shards listed in
    model.safetensors.index.json) into the full model, before it is sharded for the layout."""
    single = os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            shard_names = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for name in shard_names:
            state.update(load_file(os.path.join(directory, name)))
    elif os.path.exists(single):
        state = load_file(single)
    else:
        fail(f"--init_from_hf: no model.safetensors or model.safetensors.index.json in {directory!r}")
    try:
        model.load_hf_state_dict(state)
    except (RuntimeError, KeyError) as error:
        fail(f"--init_from_hf: the weights in {directory!r} do not fit the model config: {' '.join(str(error).split())}")
