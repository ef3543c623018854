"""Export the latest complete checkpoint of a run of step 10 or later, saved in any layout and zero stage, as a
Hugging Face Llama or Mixtral model: config.json (the run's model config, layer and head overrides included), the
tokenizer, model.safetensors.

    python tools/export_hf.py runs/ckpt runs/tiny_llama_trained
    python -c "from transformers import AutoModelForCausalLM as M; M.from_pretrained('runs/tiny_llama_trained')"

The weights are assembled exactly as a resume assembles them (step15_expert_parallel/checkpoint.py): every tensor
from the tensor-parallel pieces of the files that hold it (and the experts from the expert-parallel ranks'), the
pipeline stages' layers under their global indices. The optimizer state stays behind. A mixture of experts is
written in Mixtral's original format, as transformers' save_pretrained writes it: one tensor per expert and matrix
(block_sparse_moe.experts.N.w1 = gate, w3 = up, w2 = down), the router as block_sparse_moe.gate.
"""
import argparse
import os

from safetensors.torch import save_file
from transformers import AutoConfig, AutoTokenizer

from lib.steps import use_step

use_step("step15_expert_parallel")
from checkpoint import complete_checkpoints, read_full_tensors, read_metadata  # noqa: E402
from save_dir import damage  # noqa: E402
from utils import fail  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("save_dir", help="the --save_dir of a step 10 or step 11 run")
    parser.add_argument("out_dir", help="where to write the Hugging Face model directory")
    args = parser.parse_args()

    checkpoints = complete_checkpoints(args.save_dir)
    if not checkpoints:
        fail(f"no complete checkpoint in {args.save_dir}")
    problem = damage(checkpoints[-1])
    if problem:
        fail(f"the newest checkpoint {checkpoints[-1]} is damaged: {problem}")
    metadata = read_metadata(checkpoints[-1])
    weights = read_full_tensors(checkpoints[-1], lambda key: key.startswith("model."))
    # Our names are transformers' (model.layers.0..., model.norm...) except for the LM head, which sits beside
    # LlamaForCausalLM's `model`. A tied LM head was saved once, as the embedding, as transformers expects.
    weights = unfuse_experts({("lm_head.weight" if key == "model.lm_head.weight" else key): t
                              for key, t in weights.items()})

    os.makedirs(args.out_dir, exist_ok=True)
    config = dict(metadata["run"]["config"])
    AutoConfig.for_model(config.pop("model_type", "llama"), **config).save_pretrained(args.out_dir)
    AutoTokenizer.from_pretrained(metadata["run"]["model_name"]).save_pretrained(args.out_dir)
    save_file(weights, os.path.join(args.out_dir, "model.safetensors"), metadata={"format": "pt"})
    layout = " x ".join(f"{kind} {metadata['layout'][f'{kind}_size']}" for kind in ("dp", "pp", "cp", "tp"))
    print(f"exported {checkpoints[-1]} (step {metadata['step']}, saved at {layout}) to {args.out_dir}")


def unfuse_experts(weights):
    """Fused expert tensors (mlp.experts.gate_up_proj [E, 2I, H], down_proj [E, H, I]) and the router (mlp.gate)
    under Mixtral's original names; a dense model's weights unchanged."""
    out = {}
    for key, tensor in weights.items():
        moe = key.rsplit(".mlp.", 1)[0] + ".block_sparse_moe"
        if key.endswith(".mlp.experts.gate_up_proj"):
            gate, up = tensor.chunk(2, dim=1)  # [E, I, H] each
            for expert in range(tensor.shape[0]):
                out[f"{moe}.experts.{expert}.w1.weight"] = gate[expert].contiguous()
                out[f"{moe}.experts.{expert}.w3.weight"] = up[expert].contiguous()
        elif key.endswith(".mlp.experts.down_proj"):
            for expert in range(tensor.shape[0]):
                out[f"{moe}.experts.{expert}.w2.weight"] = tensor[expert].contiguous()
        elif key.endswith(".mlp.gate.weight"):
            out[f"{moe}.gate.weight"] = tensor
        else:
            out[key] = tensor
    return out


if __name__ == "__main__":
    main()
