"""Start from Hugging Face Llama or Mixtral weights (--init_from_hf), each rank reading only the slices it keeps.

Mixtral's experts come in two formats: transformers 5 holds them fused (mlp.experts.gate_up_proj [E, 2I, H],
mlp.experts.down_proj [E, H, I], mlp.gate), and save_pretrained writes Mixtral's original one tensor per expert and
matrix (block_sparse_moe.experts.N.w1 = gate, w3 = up, w2 = down; block_sparse_moe.gate). The second is read as the
first: a fused tensor's block is assembled from the experts' tensors it covers."""
import json
import os
import re

import torch
from safetensors import safe_open

from utils import fail


class HFWeights:
    """A Hugging Face Llama directory (model.safetensors, or the shards that model.safetensors.index.json lists) as a
    source of weights.py: read_block reads the rows and columns asked for from the file, nothing more. Names are
    ours (transformers' without `model.`); a checkpoint that holds no LM head is tied: the embedding is read."""

    def __init__(self, directory, shapes):
        """shapes: {name: shape} of every parameter of the full model; a mismatch stops the run with one line."""
        single = os.path.join(directory, "model.safetensors")
        index = os.path.join(directory, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                paths = [os.path.join(directory, name) for name in sorted(set(json.load(f)["weight_map"].values()))]
        elif os.path.exists(single):
            paths = [single]
        else:
            fail(f"--init_from_hf: no model.safetensors or model.safetensors.index.json in {directory!r}")
        self.where = {}  # our name -> (open file, its key there)
        self.legacy = {}  # fused name -> [(file, key) of each expert's matrices]: the original Mixtral format
        for path in paths:
            file = safe_open(path, framework="pt")
            for key in file.keys():
                legacy = re.fullmatch(r"model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.(w[123])\.weight", key)
                if legacy:
                    layer, expert, matrix = legacy.groups()
                    fused = f"layers.{layer}.mlp.experts.{'down_proj' if matrix == 'w2' else 'gate_up_proj'}"
                    self.legacy.setdefault(fused, {})[(int(expert), matrix)] = (file, key)
                    self.where[fused] = None  # read through self.legacy
                elif "rotary_emb" not in key:  # rotary buffers are recomputed on the fly
                    self.where[key.removeprefix("model.").replace("block_sparse_moe.gate", "mlp.gate")] = (file, key)
        if "lm_head.weight" not in shapes:  # tied: the model's LM head is its embedding
            self.where.pop("lm_head.weight", None)
        self.where.setdefault("lm_head.weight", self.where.get("embed_tokens.weight"))
        problems = [f"missing {name}" for name in shapes if self.where.get(name) is None and name not in self.legacy]
        problems += [f"unexpected {name}" for name in self.where if name not in shapes and name != "lm_head.weight"]
        problems += [f"{name} is {list(self.shape(name))}, the config says {list(shape)}"
                     for name, shape in shapes.items()
                     if (self.where.get(name) or name in self.legacy) and self.shape(name) != list(shape)]
        if problems:
            fail(f"--init_from_hf: the weights in {directory!r} do not fit the model config: {'; '.join(problems[:3])}")

    def shape(self, name):
        if name in self.legacy:
            experts = max(expert for expert, _ in self.legacy[name]) + 1
            first = [self.expert_matrix(name, 0, m).get_shape() for m in self.matrices(name)]
            return [experts, sum(shape[0] for shape in first), first[0][1]]
        file, key = self.where[name]
        return file.get_slice(key).get_shape()

    def matrices(self, name):
        return ("w2",) if name.endswith("down_proj") else ("w1", "w3")  # gate rows, then up rows

    def expert_matrix(self, name, expert, matrix):
        file, key = self.legacy[name][(expert, matrix)]
        return file.get_slice(key)

    def read_block(self, name, rows, cols):
        if name in self.legacy:  # whole experts, flattened [E, 2I * H]: the columns asked for of each
            return torch.stack([torch.cat([self.expert_matrix(name, e, m)[:] for m in self.matrices(name)]).reshape(-1)
                                [cols[0]:cols[1]] for e in range(*rows)]).float()
        file, key = self.where[name]
        part = file.get_slice(key)
        if len(part.get_shape()) == 1:
            return part[rows[0]:rows[1]].float().reshape(-1, 1)
        if len(part.get_shape()) == 3:  # fused experts [E, ., .]: whole experts, flattened
            return part[rows[0]:rows[1]].reshape(rows[1] - rows[0], -1)[:, cols[0]:cols[1]].float()
        return part[rows[0]:rows[1], cols[0]:cols[1]].float()
