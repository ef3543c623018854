"""Step 2: the process group manager. Every rank finds its place in the dp x pp x tp grid and
its groups, then trains on random tokens as in step 1 (no parallelism yet).

    torchrun --nproc_per_node 8 step2_process_group_manager/train.py --tp_size 2 --pp_size 2 --dp_size 2
"""
import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

import process_group_manager as pgm
from model import Llama
from process_group_manager import setup_process_group_manager, validate_layout
from utils import DEFAULT_MODEL, fail, load_config, resolve_device, resolve_dtype, set_all_seed


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
    parser.add_argument("--tp_size", type=int, default=1)
    parser.add_argument("--dp_size", type=int, default=1)
    parser.add_argument("--pp_size", type=int, default=1)
    parser.add_argument("--pp_engine", choices=["afab", "1f1b"], default="afab")
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
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    errors = validate_layout(world_size, args.tp_size, args.pp_size, args.dp_size, config)
    if errors:
        fail("; ".join(errors))

    dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    setup_process_group_manager(args.tp_size, args.pp_size, args.dp_size)
    grid = pgm.process_group_manager
    # One write per line (end=""): every rank prints here, and a separate newline write could interleave.
    print(f"rank {grid.global_rank}: {grid} | tp group {grid.tp_group_ids} | pp group {grid.pp_group_ids} "
          f"| dp group {grid.dp_group_ids} | pp prev {grid.pp_prev_rank} next {grid.pp_next_rank}\n", end="", flush=True)
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
        if grid.global_rank == 0:
            print(f"Step: {step} | Loss: {loss.item():.4f}", flush=True)

    dist.destroy_process_group()


if __name__ == "__main__":
    main()
