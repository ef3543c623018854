"""Step time of data parallelism, dp_size 2 on CPU/gloo: our naive DP (step 5), our bucketed DP
(step 6) and torch's DistributedDataParallel, in one run.

The three wrappers get the same model (same seed), the same batches, the same optimizer and the same
gradient accumulation; they take turns (rounds of a few steps each, order rotated every round) so all
see the same machine load. A fourth contestant, "local", is the bare model with no communication at
all: the gap between it and a wrapper is the communication that wrapper did not hide. Prints ms per
optimizer step (median and best round: on a shared machine the best round is the least disturbed by
others), the ratios bucket / naive and bucket / DDP, and how far apart the wrappers' losses are (they
compute the same steps). The default config has many parameters for little compute (short
sequences), so communication matters. It measures, it never asserts.

    python tools/benchmark_dp.py                   # re-launches itself under torchrun with 2 processes
    python tools/benchmark_dp.py --hidden_size 1024 --bucket_size_mb 4 --rounds 10
"""
import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from lib.steps import ROOT, use_step

# "local": the bare model, no communication at all: what the others would take if communication were free
WRAPPERS = ("naive", "bucket", "ddp", "local")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden_size", type=int, default=512)
    parser.add_argument("--intermediate_size", type=int, default=1536)
    parser.add_argument("--num_hidden_layers", type=int, default=4)
    parser.add_argument("--seq_len", type=int, default=32)
    parser.add_argument("--micro_batch_size", type=int, default=1)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=2)
    parser.add_argument("--bucket_size_mb", type=float, default=25, help="ours and DDP's bucket_cap_mb")
    parser.add_argument("--steps", type=int, default=1, help="timed optimizer steps per wrapper and round")
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    return parser.parse_args()


def load_module(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def train_step(kind, model, optimizer, micro_batches):
    """micro_batches: [grad_acc, micro_batch, seq + 1] tokens of this rank. Returns the local loss."""
    grad_acc = len(micro_batches)
    model.zero_grad()
    acc_loss = 0.0
    for i, tokens in enumerate(micro_batches):
        last = i == grad_acc - 1
        sync_context = contextlib.nullcontext()
        if kind == "ddp" and not last:
            sync_context = model.no_sync()
        elif kind in ("naive", "bucket"):
            model.require_backward_grad_sync = last
        with sync_context:
            logits = model(tokens[:, :-1])  # [batch, seq, vocab]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)) / grad_acc
            loss.backward()
        acc_loss += loss.item()
    if kind == "bucket":
        model.finish_gradient_synchronization()
    optimizer.step()
    return acc_loss


def worker(args):
    use_step("step6_data_parallel_bucket")  # model and process_group_manager
    import process_group_manager as pgm
    from model import Llama

    data_parallel_naive = load_module("data_parallel_naive", ROOT / "step5_data_parallel_naive" / "data_parallel.py")
    data_parallel_bucket = load_module("data_parallel_bucket", ROOT / "step6_data_parallel_bucket" / "data_parallel.py")

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    pgm.setup_process_group_manager(tp_size=1, pp_size=1, dp_size=dist.get_world_size())
    dp_rank, dp_size = pgm.process_group_manager.dp_rank, pgm.process_group_manager.dp_world_size
    config = json.loads((ROOT / "assets" / "tiny_llama" / "config.json").read_text())
    config.update(hidden_size=args.hidden_size, intermediate_size=args.intermediate_size,
                  num_hidden_layers=args.num_hidden_layers)
    config = SimpleNamespace(**config)

    wrap = {
        "naive": data_parallel_naive.DataParallelNaive,
        "bucket": lambda model: data_parallel_bucket.DataParallelBucket(model, args.bucket_size_mb),
        "ddp": lambda model: DistributedDataParallel(model, process_group=pgm.process_group_manager.dp_group,
                                                     bucket_cap_mb=args.bucket_size_mb),
        "local": lambda model: model,
    }
    models = {}
    for kind in WRAPPERS:
        torch.manual_seed(0)
        model = wrap[kind](Llama(config))
        models[kind] = model, torch.optim.AdamW(model.parameters(), lr=1e-3)
    num_params = sum(p.numel() for p in models["naive"][0].parameters())
    warmup = 1
    total_steps = warmup + args.rounds * args.steps
    generator = torch.Generator().manual_seed(1)
    # [steps, grad_acc, dp, micro_batch, seq + 1]: the same global batches for every wrapper
    batches = torch.randint(config.vocab_size, (total_steps, args.gradient_accumulation_steps, dp_size,
                                                args.micro_batch_size, args.seq_len + 1), generator=generator)

    losses = {kind: [] for kind in WRAPPERS}
    for kind in WRAPPERS:
        losses[kind].append(train_step(kind, *models[kind], batches[0, :, dp_rank]))
    step_ms = {kind: [] for kind in WRAPPERS}
    for round_index in range(args.rounds):
        order = WRAPPERS[round_index % len(WRAPPERS):] + WRAPPERS[:round_index % len(WRAPPERS)]
        for kind in order:
            dist.barrier()
            start = time.perf_counter()
            for step in range(warmup + round_index * args.steps, warmup + (round_index + 1) * args.steps):
                losses[kind].append(train_step(kind, *models[kind], batches[step, :, dp_rank]))
            dist.barrier()
            step_ms[kind].append((time.perf_counter() - start) * 1000 / args.steps)

    if dist.get_rank() == 0:
        median = {kind: statistics.median(step_ms[kind]) for kind in WRAPPERS}
        best = {kind: min(step_ms[kind]) for kind in WRAPPERS}
        print(f"dp_size {dp_size} | {num_params / 1e6:.1f}M parameters ({num_params * 4 / 2**20:.0f} MB of fp32 "
              f"gradients) | seq_len {args.seq_len} | micro_batch_size {args.micro_batch_size} | grad_acc "
              f"{args.gradient_accumulation_steps} | bucket_size_mb {args.bucket_size_mb} "
              f"({len(models['bucket'][0].buckets)} buckets) | {args.rounds} rounds x {args.steps} steps")
        for kind in WRAPPERS:
            rounds = ", ".join(f"{t:.0f}" for t in step_ms[kind])
            exposed = "" if kind == "local" else f", communication not hidden {best[kind] - best['local']:6.1f}"
            print(f"{kind:>6}: median {median[kind]:7.1f} ms/step, best {best[kind]:7.1f}{exposed}  "
                  f"rounds: {rounds}")
        for name, ms in (("median", median), ("best", best)):
            print(f"{name:>6}: bucket / naive {ms['bucket'] / ms['naive']:.3f}   "
                  f"bucket / DDP {ms['bucket'] / ms['ddp']:.3f}")
        diffs = [max(abs(a - b) for a, b in zip(losses[kind], losses["ddp"])) for kind in ("naive", "bucket")]
        print(f"max |loss - DDP's loss| (rank 0's share): naive {diffs[0]:.2e}, bucket {diffs[1]:.2e}")
    dist.destroy_process_group()


def main():
    args = parse_args()
    if "LOCAL_RANK" in os.environ:
        worker(args)
        return
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
               *sys.argv[1:]]
    sys.exit(subprocess.run(command, env=env).returncode)


if __name__ == "__main__":
    main()
