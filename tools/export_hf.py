"""Export the latest complete checkpoint of a step 10 or step 11 run, saved in any layout and zero stage, as a
Hugging Face Llama model: config.json (the run's model config, layer and head overrides included), the tokenizer,
model.safetensors.

    python tools/export_hf.py runs/ckpt runs/tiny_llama_trained
    python -c "from transformers import LlamaForCausalLM; LlamaForCausalLM.from_pretrained('runs/tiny_llama_trained')"

The weights are assembled exactly as a resume assembles them (step12_fsdp/checkpoint.py): every tensor
from the tensor-parallel pieces of the files that hold it, the pipeline stages' layers under their global
indices. The optimizer state stays behind.
"""
import argparse
import os

from safetensors.torch import save_file
from transformers import AutoTokenizer, LlamaConfig

from lib.steps import use_step

use_step("step12_fsdp")
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
    weights = {("lm_head.weight" if key == "model.lm_head.weight" else key): t for key, t in weights.items()}

    os.makedirs(args.out_dir, exist_ok=True)
    LlamaConfig.from_dict(metadata["run"]["config"]).save_pretrained(args.out_dir)
    AutoTokenizer.from_pretrained(metadata["run"]["model_name"]).save_pretrained(args.out_dir)
    save_file(weights, os.path.join(args.out_dir, "model.safetensors"), metadata={"format": "pt"})
    layout = " x ".join(f"{kind} {metadata['layout'][f'{kind}_size']}" for kind in ("dp", "pp", "cp", "tp"))
    print(f"exported {checkpoints[-1]} (step {metadata['step']}, saved at {layout}) to {args.out_dir}")


if __name__ == "__main__":
    main()
