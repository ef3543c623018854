"""Step 2: the process group manager. Every rank finds its place in the dp x pp x tp grid and
its groups, then trains on random tokens as in step 1 (no parallelism yet).

    torchrun --nproc_per_node 8 step2_process_group_manager/train.py --tp_size 2 --pp_size 2 --dp_size 2
"""
import argparse
import os

import torch
import torch.nn.functional as F

import process_group_manager as pgm
from model import Llama
from process_group_manager import node_warning, setup_process_group_manager, validate_layout
from utils import (ArgumentParser, DEFAULT_MODEL, check_loss, check_same_settings, close_distributed, fail,
                   init_distributed, integer, load_config, peer_failures_end_the_run, positive_float, resolve_device,
                   resolve_dtype, set_all_seed, warn)


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
    parser.add_argument("--tp_size", type=integer(1), default=1)
    parser.add_argument("--dp_size", type=integer(1), default=1)
    parser.add_argument("--pp_size", type=integer(1), default=1)
    parser.add_argument("--pp_engine", choices=["afab", "1f1b"], default="afab")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    parser.add_argument("--timeout_s", type=positive_float, default=600,
                        help="seconds a collective waits for a stalled peer before the run stops")
    return parser.parse_args()


def set_up_process(args):
    """This process's threads, device and dtype."""
    os.environ["OMP_NUM_THREADS"] = str(args.omp_num_threads)
    os.environ["TOKENIZERS_PARALLELISM"] = args.tokenizers_parallelism
    torch.set_num_threads(args.omp_num_threads)

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(args.device, local_rank)
    dtype = resolve_dtype(args.dtype, device)
    return device, dtype


def check_command_line(args, config, world_size):
    """Stop at a command line that cannot work, with one line naming every problem, before any rank waits
    for another; warn about a layout that works, but slowly."""
    errors = validate_layout(world_size, args.tp_size, args.pp_size, args.dp_size, config)
    if errors:
        fail("; ".join(errors))
    ranks_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))  # torchrun's --nproc_per_node
    warning = node_warning(args.tp_size, ranks_per_node)
    if warning:
        warn(warning)


def build_model(args, config, device, dtype):
    """Every rank builds the same full model from the same seed; and the optimizer."""
    set_all_seed(args.seed)
    model = Llama(config).to(device=device, dtype=dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    return model, optimizer


def main():
    args = parse_args()
    device, dtype = set_up_process(args)
    config = load_config(args)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    check_command_line(args, config, world_size)

    init_distributed(device, args.timeout_s)
    check_same_settings(args, config)
    setup_process_group_manager(args.tp_size, args.pp_size, args.dp_size, timeout_s=args.timeout_s)
    grid = pgm.process_group_manager
    # One write per line (end=""): every rank prints here, and a separate newline write could interleave.
    print(f"rank {grid.global_rank}: {grid} | tp group {grid.tp_group_ids} | pp group {grid.pp_group_ids} "
          f"| dp group {grid.dp_group_ids} | pp prev {grid.pp_prev_rank} next {grid.pp_next_rank}\n", end="", flush=True)
    model, optimizer = build_model(args, config, device, dtype)

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
        if grid.global_rank == 0:
            print(f"Step: {step} | Loss: {loss.item():.4f}", flush=True)

    close_distributed()


if __name__ == "__main__":
    with peer_failures_end_the_run():
        main()
