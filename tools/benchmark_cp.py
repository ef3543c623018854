"""Context parallelism (step9) at growing sequence lengths: what one rank holds when cp 1, 2 and 4 ranks
share every sequence, on CPU with gloo.

For each seq_len and cp_size, cp_size processes train the embedded tiny model on random tokens (one
sequence per micro-batch), each on its zigzag share of the tokens, gradients averaged over the cp group
as train.py does. Per rank it measures the peak bytes of activations autograd saves for backward
(weights excluded, as tools/benchmark_pp.py does), the peak RSS, and tokens/s of the whole group. Prints
the numbers and each cp size's activation ratio to cp 1 at the same seq_len. It measures, it never
asserts; timings of 4 processes on a 2-core machine say little, the activation bytes are exact.

    python tools/benchmark_cp.py
    python tools/benchmark_cp.py --seq_lens 1024 2048 --cp_sizes 1 2 --steps 1
"""
import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from transformers import AutoConfig

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "step9_context_parallel"))
import process_group_manager as pgm  # noqa: E402
from context_parallel import apply_context_parallel, split_batch_for_context_parallel  # noqa: E402
from data_parallel import DataParallelBucket  # noqa: E402
from model import Llama  # noqa: E402

sys.path.insert(0, str(ROOT / "tools" / "lib"))
from measure import ActivationMeter, RandomBatches, free_port  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name", default=str(ROOT / "assets" / "tiny_llama"))
    parser.add_argument("--seq_lens", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--cp_sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=2, help="timed optimizer steps (after 1 warm-up step)")
    return parser.parse_args()


def worker(rank, cp_size, seq_len, port, args, result_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=cp_size)
    pgm.setup_process_group_manager(1, cp_size, 1, 1)  # tp, cp, pp, dp
    config = AutoConfig.from_pretrained(args.model_name)
    torch.manual_seed(0)
    model = Llama(config)
    if cp_size > 1:
        model = DataParallelBucket(apply_context_parallel(model))
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
            if cp_size > 1:
                model.finish_gradient_synchronization()
            optimizer.step()
            durations.append(time.perf_counter() - start)
    result = {"activation_bytes": meter.peak, "rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "step_seconds": sum(durations[1:]) / args.steps}
    (Path(result_dir) / f"{seq_len}_{cp_size}_{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def main():
    args = parse_args()
    os.environ.pop("VERBOSE", None)  # the ring's per-exchange prints would swamp the numbers
    print(f"tiny model, CPU fp32, gloo, one sequence per step | {args.steps} timed steps | {os.cpu_count()} cores")
    print(f"{'seq_len':>7} {'cp':>3} {'act MB/rank':>12} {'vs cp 1':>8} {'RSS MB/rank':>12} {'tokens/s':>9}")
    with tempfile.TemporaryDirectory() as result_dir:
        for seq_len in args.seq_lens:
            baseline = None
            for cp_size in args.cp_sizes:
                mp.spawn(worker, args=(cp_size, seq_len, free_port(), args, result_dir), nprocs=cp_size)
                ranks = [json.loads((Path(result_dir) / f"{seq_len}_{cp_size}_{rank}.json").read_text())
                         for rank in range(cp_size)]
                activations = max(r["activation_bytes"] for r in ranks)  # the fullest rank is what must fit
                baseline = baseline or (activations if cp_size == 1 else None)
                ratio = f"{activations / baseline:.2f}" if baseline else "-"
                print(f"{seq_len:>7} {cp_size:>3} {activations / 2**20:>12.1f} {ratio:>8} "
                      f"{max(r['rss_bytes'] for r in ranks) / 2**20:>12.0f} "
                      f"{seq_len / max(r['step_seconds'] for r in ranks):>9.0f}", flush=True)


if __name__ == "__main__":
    main()
