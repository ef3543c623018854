"""Checkpoints with safetensors: save, resume exactly, and start from Hugging Face Llama weights.

Layout on disk:

    save_dir/step_000020/rank_000.safetensors   model shard + optimizer state of rank 0, and in its
    save_dir/step_000020/rank_001.safetensors   metadata: step, tokens, data position, RNG states, layout
    save_dir/step_000020/COMPLETE               written once every rank's file is in place

Each rank writes only what it holds (its tensor-parallel shard, its pipeline stage), so this code is
the same whatever the layout: a checkpoint records the layout it was saved with and is resumed
with that same layout. A file is written under a temporary name and renamed, and a checkpoint
counts only once COMPLETE exists, so a run killed mid-save leaves the previous one usable.
"""
import json
import os
import random
import shutil

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from utils import fail

COMPLETE = "COMPLETE"


def rank_file(checkpoint_dir, rank):
    return os.path.join(checkpoint_dir, f"rank_{rank:03d}.safetensors")


def complete_checkpoints(save_dir):
    """Finished checkpoint folders in save_dir, oldest first."""
    if not os.path.isdir(save_dir):
        return []
    names = sorted(n for n in os.listdir(save_dir) if n.startswith("step_"))
    return [os.path.join(save_dir, n) for n in names if os.path.exists(os.path.join(save_dir, n, COMPLETE))]


def rng_states():
    return {"python": random.getstate(), "numpy": [v.tolist() if isinstance(v, np.ndarray) else v
                                                   for v in np.random.get_state()]}


def set_rng_states(states, torch_state, cuda_state):
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch_state)
    if cuda_state is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_state)


def save_checkpoint(save_dir, step, tokens, model, optimizer, data_loader, layout, keep_last):
    """Every rank writes its part; rank 0 marks the checkpoint complete and prunes old ones."""
    rank = dist.get_rank()
    checkpoint_dir = os.path.join(save_dir, f"step_{step:06d}")
    os.makedirs(checkpoint_dir, exist_ok=True)

    # Tied weights are one tensor under two names; safetensors wants distinct storage, so copy.
    tensors = {f"model.{name}": t.detach().clone().contiguous() for name, t in model.state_dict().items()}
    optimizer_state = optimizer.state_dict()
    for index, state in optimizer_state["state"].items():
        for key, value in state.items():
            tensors[f"optimizer.{index}.{key}"] = value.detach().clone().contiguous()
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    metadata = {"step": step, "tokens": tokens, "layout": layout, "data": data_loader.state_dict(),
                "optimizer_param_groups": optimizer_state["param_groups"], "rng": rng_states()}

    path = rank_file(checkpoint_dir, rank)
    save_file({k: v.cpu() for k, v in tensors.items()}, path + ".tmp", metadata={"json": json.dumps(metadata)})
    os.replace(path + ".tmp", path)  # atomic: a reader sees the old file or the whole new one

    dist.barrier()  # every rank's file is in place
    if rank == 0:
        with open(os.path.join(checkpoint_dir, COMPLETE + ".tmp"), "w") as f:
            f.write(f"{dist.get_world_size()}\n")
        os.replace(os.path.join(checkpoint_dir, COMPLETE + ".tmp"), os.path.join(checkpoint_dir, COMPLETE))
        for old in complete_checkpoints(save_dir)[:-keep_last]:
            shutil.rmtree(old)
    dist.barrier()  # no rank races ahead to a next save while rank 0 prunes


def load_checkpoint(save_dir, model, optimizer, data_loader, layout):
    """Restore this rank's part of the latest complete checkpoint; returns (step, tokens)."""
    checkpoints = complete_checkpoints(save_dir)
    if not checkpoints:
        fail(f"--resume: no complete checkpoint in --save_dir {save_dir!r}", every_rank=True)
    checkpoint_dir = checkpoints[-1]
    path = rank_file(checkpoint_dir, dist.get_rank())
    if not os.path.exists(path):
        fail(f"checkpoint {checkpoint_dir} has no file for rank {dist.get_rank()} ({os.path.basename(path)}): "
             f"it is incomplete or was saved with fewer processes", every_rank=True)
    try:
        with safe_open(path, framework="pt") as f:
            metadata = json.loads(f.metadata()["json"])
        tensors = load_file(path)
    except Exception as error:  # safetensors raises its own error types for truncated or garbled files
        fail(f"cannot read checkpoint file {path}: {error}", every_rank=True)
    if metadata["layout"] != layout:
        fail(f"checkpoint {checkpoint_dir} was saved with layout {metadata['layout']}, this run has {layout}; "
             f"resume with the same --tp_size/--cp_size/--pp_size/--dp_size", every_rank=True)

    model_state = {k.removeprefix("model."): v for k, v in tensors.items() if k.startswith("model.")}
    expected = model.state_dict()
    problems = [f"{k}: checkpoint {tuple(model_state[k].shape)} vs model {tuple(v.shape)}"
                for k, v in expected.items() if k in model_state and model_state[k].shape != v.shape]
    problems += [f"{k}: missing" for k in expected if k not in model_state]
    problems += [f"{k}: unexpected" for k in model_state if k not in expected]
    if problems:
        fail(f"checkpoint {path} does not fit the model ({len(problems)} tensors, first 5): " + "; ".join(problems[:5]),
             every_rank=True)
    model.load_state_dict(model_state)

    optimizer_state = {"state": {}, "param_groups": metadata["optimizer_param_groups"]}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            optimizer_state["state"].setdefault(int(index), {})[name] = value
    optimizer.load_state_dict(optimizer_state)
    data_loader.load_state_dict(metadata["data"])
    set_rng_states(metadata["rng"], tensors["rng.torch"], tensors.get("rng.cuda"))
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
