"""Step 1: the model. Train a few optimizer steps on random tokens to see forward, backward and
the optimizer work end to end.

    torchrun --nproc_per_node 1 step1_modeling/train.py
"""
import argparse
import os

import torch
import torch.nn.functional as F

from model import Llama
from utils import (ArgumentParser, DEFAULT_MODEL, check_loss, check_same_settings, close_distributed, init_distributed,
                   integer, load_config, peer_failures_end_the_run, positive_float, resolve_device, resolve_dtype,
                   set_all_seed)


def parse_args():
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--omp_num_threads", type=integer(1), default=1)
    parser.add_argument("--tokenizers_parallelism", type=str, default="false")
    parser.add_argument("--model_name", type=str, default=DEFAULT_MODEL)
    parser.add_argument("--num_hidden_layers", type=integer(1), default=None, help="default: the model config's")
    parser.add_argument("--num_attention_heads", type=integer(1), default=None, help="default: the model config's")
    parser.add_argument("--num_key_value_heads", type=integer(1), default=None, help="default: the model config's")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--learning_rate", type=positive_float, default=1e-3)
    parser.add_argument("--seq_len", type=integer(1), default=128)
    parser.add_argument("--micro_batch_size", type=integer(1), default=4)
    parser.add_argument("--max_tokens", type=integer(1), default=2560, help="train until this many tokens were seen")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    parser.add_argument("--timeout_s", type=positive_float, default=600,
                        help="seconds a collective waits for a stalled peer before the run stops")
    return parser.parse_args()


def main():
    args = parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.omp_num_threads)
    os.environ["TOKENIZERS_PARALLELISM"] = args.tokenizers_parallelism
    torch.set_num_threads(args.omp_num_threads)

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(args.device, local_rank)
    dtype = resolve_dtype(args.dtype, device)
    config = load_config(args)

    init_distributed(device, args.timeout_s)
    check_same_settings(args, config)
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
        check_loss(loss.item(), step)
        print(f"Step: {step} | Loss: {loss.item():.4f}", flush=True)

    close_distributed()


if __name__ == "__main__":
    with peer_failures_end_the_run():
        main()
