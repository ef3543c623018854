"""Step 1: the model. Train a few optimizer steps on random tokens to see forward, backward and
the optimizer work end to end.

    torchrun --nproc_per_node 1 step1_modeling/train.py
"""
import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

from model import Llama
from utils import DEFAULT_MODEL, load_config, resolve_device, resolve_dtype, set_all_seed


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--omp_num_threads", type=str, default="1")
    parser.add_argument("--tokenizers_parallelism", type=str, default="false")
    parser.add_argument("--model_name", type=str, default=DEFAULT_MODEL)
    parser.add_argument("--num_hidden_layers", type=int, default=None, help="default: the model config's")
    parser.add_argument("--num_attention_heads", type=int, default=None, help="default: the model config's")
    parser.add_argument("--num_key_value_heads", type=int, default=None, help="default: the model config's")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--micro_batch_size", type=int, default=4)
    parser.add_argument("--max_tokens", type=int, default=2560, help="train until this many tokens were seen")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    return parser.parse_args()


def main():
    args = parse_args()
    os.environ["OMP_NUM_THREADS"] = args.omp_num_threads
    os.environ["TOKENIZERS_PARALLELISM"] = args.tokenizers_parallelism
    torch.set_num_threads(int(args.omp_num_threads))

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(args.device, local_rank)
    dtype = resolve_dtype(args.dtype, device)
    config = load_config(args)

    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    set_all_seed(args.seed)
    model = Llama(config).to(device=device, dtype=dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)

    # Random tokens: the loss starts near ln(vocab_size) and falls as the model memorises the batch.
    input_ids = torch.randint(0, config.vocab_size, (args.micro_batch_size, args.seq_len + 1), device=device)
    inputs, targets = input_ids[:, :-1], input_ids[:, 1:]
    tokens_per_step = args.micro_batch_size * args.seq_len
    for step in range(1, -(-args.max_tokens // tokens_per_step) + 1):
        optimizer.zero_grad()
        logits = model(inputs)  # [batch, seq, vocab]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
        loss.backward()
        optimizer.step()
        print(f"Step: {step} | Loss: {loss.item():.4f}", flush=True)

    dist.destroy_process_group()


if __name__ == "__main__":
    main()
