"""Context parallelism (step9) at growing sequence lengths: what one rank holds and how fast the group trains
when cp 1, 2 and 4 ranks share every sequence, beside dp 2 for scale, on CPU with gloo, one thread per rank.

For each seq_len and layout, the layout's processes train the embedded tiny model on random tokens (one
sequence per micro-batch and rank): cpN splits every sequence over N ranks (each keeps its zigzag share,
gradients averaged over the cp group as train.py does), dp2 gives each of 2 ranks a whole sequence of its
own. Per rank it measures the peak bytes of activations autograd saves for backward (weights excluded, as
tools/benchmark_pp.py does) and the peak RSS; per layout, tokens/s of the whole group (the slowest rank's
step time). Prints each layout's activations and tokens/s as a ratio to cp 1 at the same seq_len, beside
the goals for cp 2 (activations <= 0.6x, tokens/s >= 1.6x) and cp 4 (activations <= 0.35x). It measures, it
never asserts: the activation bytes are exact, tokens/s need one free core per rank.

    python tools/benchmark_cp.py
    python tools/benchmark_cp.py --seq_lens 4096 --layouts cp1 cp2 dp2     # the speed goal, on 2 free cores
    python tools/benchmark_cp.py --seq_lens 1024 --steps 1                  # a quick look
"""
import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from transformers import AutoConfig

from lib.measure import ActivationMeter, RandomBatches, free_port, peak_rss_bytes
from lib.steps import ROOT, use_step

use_step("step9_context_parallel")
import process_group_manager as pgm  # noqa: E402
from context_parallel import apply_context_parallel, split_batch_for_context_parallel  # noqa: E402
from data_parallel import DataParallelBucket  # noqa: E402
from model import Llama  # noqa: E402

# name: (cp_size, dp_size), with the goals for the ratios to cp 1: (activations at most, tokens/s at least)
LAYOUTS = {"cp1": (1, 1), "cp2": (2, 1), "dp2": (1, 2), "cp4": (4, 1)}
GOALS = {"cp2": (0.6, 1.6), "cp4": (0.35, None)}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name", default=str(ROOT / "assets" / "tiny_llama"))
    parser.add_argument("--seq_lens", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    parser.add_argument("--steps", type=int, default=2, help="timed optimizer steps (after 1 warm-up step)")
    return parser.parse_args()


def worker(rank, layout, seq_len, port, args, result_dir):
    torch.set_num_threads(1)
    cp_size, dp_size = LAYOUTS[layout]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=cp_size * dp_size)
    pgm.setup_process_group_manager(1, cp_size, 1, dp_size)  # tp, cp, pp, dp
    config = AutoConfig.from_pretrained(args.model_name)
    torch.manual_seed(0)
    model = Llama(config)
    if cp_size > 1:
        model = apply_context_parallel(model)
    if cp_size * dp_size > 1:
        model = DataParallelBucket(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = RandomBatches(1, seq_len, config.vocab_size, 1)
    meter = ActivationMeter(model.parameters())

    durations = []
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        for _ in range(1 + args.steps):
            dist.barrier()
            start = time.perf_counter()
            model.zero_grad()
            batch = split_batch_for_context_parallel(next(batches))  # [1, seq / cp] each
            logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"])
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["target_ids"].reshape(-1)).backward()
            if cp_size * dp_size > 1:
                model.finish_gradient_synchronization()
            optimizer.step()
            durations.append(time.perf_counter() - start)
    result = {"activation_bytes": meter.peak, "rss_bytes": peak_rss_bytes(),
              "step_seconds": sum(durations[1:]) / args.steps}
    (Path(result_dir) / f"{seq_len}_{layout}_{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def ratio(value, goal, at_least):
    """'0.52 (<= 0.6)': the measured ratio beside its goal."""
    if goal is None:
        return f"{value:.2f}"
    return f"{value:.2f} ({'>=' if at_least else '<='} {goal})"


def main():
    args = parse_args()
    os.environ.pop("VERBOSE", None)  # the ring's per-exchange prints would swamp the numbers
    print(f"tiny model, CPU fp32, gloo, one thread per rank, one sequence per step and rank | {args.steps} timed "
          f"steps | {os.cpu_count()} cores")
    print(f"{'seq_len':>7} {'layout':>6} {'act MB/rank':>12} {'vs cp 1':>14} {'RSS MB/rank':>12} {'tokens/s':>9} "
          f"{'vs cp 1':>14}")
    with tempfile.TemporaryDirectory() as result_dir:
        for seq_len in args.seq_lens:
            baseline = None  # cp 1's (activations, tokens/s), when it is measured
            for layout in args.layouts:
                cp_size, dp_size = LAYOUTS[layout]
                mp.spawn(worker, args=(layout, seq_len, free_port(), args, result_dir), nprocs=cp_size * dp_size)
                ranks = [json.loads((Path(result_dir) / f"{seq_len}_{layout}_{rank}.json").read_text())
                         for rank in range(cp_size * dp_size)]
                activations = max(r["activation_bytes"] for r in ranks)  # the fullest rank is what must fit
                tokens_per_second = dp_size * seq_len / max(r["step_seconds"] for r in ranks)
                if layout == "cp1":
                    baseline = (activations, tokens_per_second)
                activation_goal, speed_goal = GOALS.get(layout, (None, None))
                versus = ("-", "-") if baseline is None else (
                    ratio(activations / baseline[0], activation_goal, at_least=False),
                    ratio(tokens_per_second / baseline[1], speed_goal, at_least=True))
                print(f"{seq_len:>7} {layout:>6} {activations / 2**20:>12.1f} {versus[0]:>14} "
                      f"{max(r['rss_bytes'] for r in ranks) / 2**20:>12.0f} {tokens_per_second:>9.0f} {versus[1]:>14}",
                      flush=True)


if __name__ == "__main__":
    main()
