"""Start from Hugging Face Llama weights (--init_from_hf)."""
import json
import os

from safetensors.torch import load_file

from utils import fail


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
