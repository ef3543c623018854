"""Training throughput of our Llama against transformers' LlamaForCausalLM, in one run.

Both models get the same config, the same weights, the same batches, dtype and optimizer; their
steps are interleaved (taking turns going first) so both see the same machine load. Prints
tokens/s of each and the ratio ours / theirs. It measures, it never asserts.

    python tools/benchmark_model.py                      # the embedded tiny model, CPU fp32
    python tools/benchmark_model.py --hidden_size 512 --num_hidden_layers 8 --seq_len 256
"""
import argparse
import time

import torch
import torch.nn.functional as F
from transformers import AutoConfig, LlamaForCausalLM

from lib.steps import ROOT, use_step

use_step("step1_modeling")
from model import Llama  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name", default=str(ROOT / "assets" / "tiny_llama"))
    parser.add_argument("--hidden_size", type=int, default=None)
    parser.add_argument("--intermediate_size", type=int, default=None)
    parser.add_argument("--num_hidden_layers", type=int, default=None)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--micro_batch_size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model (after 2 warm-up steps)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    return parser.parse_args()


def train_step(forward, optimizer, input_ids, target_ids):
    optimizer.zero_grad()
    logits = forward(input_ids)  # [batch, seq, vocab]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target_ids.reshape(-1))
    loss.backward()
    optimizer.step()
    return loss.item()


def main():
    args = parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    config = AutoConfig.from_pretrained(args.model_name)
    config.update({name: getattr(args, name) for name in ("hidden_size", "intermediate_size", "num_hidden_layers")
                   if getattr(args, name) is not None})
    config.head_dim = config.hidden_size // config.num_attention_heads

    torch.manual_seed(0)
    theirs = LlamaForCausalLM(config).to(args.device, dtype)
    ours = Llama(config)
    ours.load_hf_state_dict(theirs.state_dict())
    ours = ours.to(args.device, dtype)
    models = {
        "ours": (lambda ids: ours(ids), torch.optim.AdamW(ours.parameters(), lr=1e-4)),
        "transformers": (lambda ids: theirs(input_ids=ids).logits, torch.optim.AdamW(theirs.parameters(), lr=1e-4)),
    }

    batches = [torch.randint(0, config.vocab_size, (args.micro_batch_size, args.seq_len + 1), device=args.device)
               for _ in range(args.steps + 2)]
    seconds = {name: 0.0 for name in models}
    for i, batch in enumerate(batches):
        order = list(models) if i % 2 == 0 else list(models)[::-1]  # take turns going first
        for name in order:
            forward, optimizer = models[name]
            start = time.perf_counter()
            train_step(forward, optimizer, batch[:, :-1], batch[:, 1:])
            if args.device == "cuda":
                torch.cuda.synchronize()
            if i >= 2:  # the first steps pay for allocations and kernel selection
                seconds[name] += time.perf_counter() - start

    tokens = args.steps * args.micro_batch_size * args.seq_len
    params = sum(p.numel() for p in ours.parameters())
    print(f"config: hidden {config.hidden_size}, layers {config.num_hidden_layers}, heads {config.num_attention_heads}/"
          f"{config.num_key_value_heads}, vocab {config.vocab_size}, {params / 1e6:.1f}M params | batch "
          f"{args.micro_batch_size}x{args.seq_len} | {args.device} {args.dtype} | {args.threads} threads")
    for name in models:
        print(f"{name:>13}: {tokens / seconds[name]:10.0f} tokens/s")
    print(f"ratio ours / transformers: {seconds['transformers'] / seconds['ours']:.3f}x")


if __name__ == "__main__":
    main()
