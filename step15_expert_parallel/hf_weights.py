"""Start from Hugging Face Llama weights (--init_from_hf), each rank reading only the slices it keeps."""
import json
import os

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
        for path in paths:
            file = safe_open(path, framework="pt")
            for key in file.keys():
                if "rotary_emb" not in key:  # rotary buffers are recomputed on the fly
                    self.where[key.removeprefix("model.")] = (file, key)
        if "lm_head.weight" not in shapes:  # tied: the model's LM head is its embedding
            self.where.pop("lm_head.weight", None)
        self.where.setdefault("lm_head.weight", self.where.get("embed_tokens.weight"))
        problems = [f"missing {name}" for name in shapes if self.where.get(name) is None]
        problems += [f"unexpected {name}" for name in self.where if name not in shapes and name != "lm_head.weight"]
        problems += [f"{name} is {list(self.shape(name))}, the config says {list(shape)}"
                     for name, shape in shapes.items() if self.where.get(name) and self.shape(name) != list(shape)]
        if problems:
            fail(f"--init_from_hf: the weights in {directory!r} do not fit the model config: {'; '.join(problems[:3])}")

    def shape(self, name):
        file, key = self.where[name]
        return file.get_slice(key).get_shape()

    def read_block(self, name, rows, cols):
        file, key = self.where[name]
        part = file.get_slice(key)
        if len(part.get_shape()) == 1:
            return part[rows[0]:rows[1]].float().reshape(-1, 1)
        return part[rows[0]:rows[1], cols[0]:cols[1]].float()
