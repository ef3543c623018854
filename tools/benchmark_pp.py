"""AFAB against 1F1B (step8's pipeline schedules) at pp 2 and 4, on CPU with gloo, in one run.

Each layout runs in its own group of pp_size processes, on the embedded tiny model with random tokens
(the schedules, not the data, are measured). Per stage it measures the peak bytes of activations held
for backward (every tensor autograd saves, counted through saved-tensor hooks while it is alive, weights
excluded) and the peak RSS; per layout, tokens/s. Prints the numbers and the 1F1B / AFAB ratios.
It measures, it never asserts; on a shared CPU the timings are noisy, the activation bytes are not.

    python tools/benchmark_pp.py
    python tools/benchmark_pp.py --micro_batch_size 4 --seq_len 256 --steps 5
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
from transformers import AutoConfig

from lib.measure import ActivationMeter, RandomBatches, free_port, peak_rss_bytes
from lib.steps import ROOT, use_step

use_step("step8_pipeline_parallel_1f1b")
import process_group_manager as pgm  # noqa: E402
from model import Llama  # noqa: E402
from pipeline_parallel import PipelineParallel, train_step_pipeline_1f1b, train_step_pipeline_afab  # noqa: E402

ENGINES = {"afab": train_step_pipeline_afab, "1f1b": train_step_pipeline_1f1b}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name", default=str(ROOT / "assets" / "tiny_llama"))
    parser.add_argument("--pp_sizes", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--gradient_accumulation_steps", type=int, default=8)
    parser.add_argument("--micro_batch_size", type=int, default=2)
    parser.add_argument("--seq_len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps (after 1 warm-up step)")
    return parser.parse_args()


def worker(rank, pp_size, engine, port, args, result_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=pp_size)
    pgm.setup_process_group_manager(1, pp_size, 1)
    config = AutoConfig.from_pretrained(args.model_name)
    torch.manual_seed(0)
    model = PipelineParallel(Llama(config), config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = RandomBatches(args.micro_batch_size, args.seq_len, config.vocab_size, args.gradient_accumulation_steps)
    tensor_shapes = (args.micro_batch_size, args.seq_len, config.hidden_size)
    meter = ActivationMeter(model.parameters())

    durations = []
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        for _ in range(1 + args.steps):
            dist.barrier()  # every stage starts the step together, so the last stage's time is the step's
            start = time.perf_counter()
            optimizer.zero_grad()
            ENGINES[engine](model, batches, tensor_shapes=tensor_shapes, device=torch.device("cpu"),
                            dtype=torch.float32)
            optimizer.step()
            durations.append(time.perf_counter() - start)
    result = {"stage": pgm.process_group_manager.pp_rank, "layers": [model.start_layer, model.end_layer],
              "activation_bytes": meter.peak, "rss_bytes": peak_rss_bytes(),
              "step_seconds": sum(durations[1:]) / args.steps}
    (Path(result_dir) / f"{pp_size}_{engine}_{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def main():
    args = parse_args()
    os.environ.pop("VERBOSE", None)  # the schedules' per-message prints would swamp the numbers
    tokens_per_step = args.micro_batch_size * args.seq_len * args.gradient_accumulation_steps
    print(f"tiny model, CPU fp32, gloo | micro_batch_size {args.micro_batch_size} x seq_len {args.seq_len} x "
          f"grad_acc {args.gradient_accumulation_steps} = {tokens_per_step} tokens per step | {args.steps} timed steps "
          f"| {os.cpu_count()} cores")
    with tempfile.TemporaryDirectory() as result_dir:
        results = {}
        for pp_size in args.pp_sizes:
            for engine in ENGINES:
                mp.spawn(worker, args=(pp_size, engine, free_port(), args, result_dir), nprocs=pp_size)
                stages = [json.loads((Path(result_dir) / f"{pp_size}_{engine}_{rank}.json").read_text())
                          for rank in range(pp_size)]
                results[pp_size, engine] = stages

    for pp_size in args.pp_sizes:
        afab, one_f_one_b = results[pp_size, "afab"], results[pp_size, "1f1b"]
        afab_speed = tokens_per_step / max(s["step_seconds"] for s in afab)
        ofob_speed = tokens_per_step / max(s["step_seconds"] for s in one_f_one_b)
        print(f"\npp {pp_size}: tokens/s afab {afab_speed:.0f} | 1f1b {ofob_speed:.0f} | ratio 1f1b/afab "
              f"{ofob_speed / afab_speed:.2f}")
        print(f"  {'stage':>5} {'layers':>8} {'act MB afab':>12} {'act MB 1f1b':>12} {'ratio':>6} "
              f"{'RSS MB afab':>12} {'RSS MB 1f1b':>12} {'ratio':>6}")
        for a, b in zip(afab, one_f_one_b):
            print(f"  {a['stage']:>5} {'%d-%d' % (a['layers'][0], a['layers'][1] - 1):>8} "
                  f"{a['activation_bytes'] / 2**20:>12.1f} {b['activation_bytes'] / 2**20:>12.1f} "
                  f"{b['activation_bytes'] / a['activation_bytes']:>6.2f} "
                  f"{a['rss_bytes'] / 2**20:>12.0f} {b['rss_bytes'] / 2**20:>12.0f} "
                  f"{b['rss_bytes'] / a['rss_bytes']:>6.2f}")


if __name__ == "__main__":
    main()
