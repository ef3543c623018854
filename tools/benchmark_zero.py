"""ZeRO-1/2/3 (steps 11, 12) per rank: memory of parameters, gradients and optimizer state, bytes sent and step
time, for zero_stage 0 to 3 at dp 1, 2, 4 on CPU with gloo, beside PyTorch's ZeRO-1.

For each dp size N, N processes train the same Llama (same seed) on the same random batches with
step12_fsdp/zero.py (whose stages 0-2 are step 11's), one model per zero stage, taking turns (1 warm-up step each,
then rounds of one step each, order rotated every round) so all see the same machine load. The warm-up step, which
is not timed, is also the one watched (tools/lib/watch.py: Python's profiler hook passes on the calls of the
collectives and the returns from sharded_bucket.py's functions, and the tool reads there; nothing of step 12 is
replaced or wrapped, and the timed steps run unwatched). Every step makes the same calls, so the watched one
stands for all. Per rank it measures:

  param_bytes      the compute parameters (the buckets' flat parameter buffers; at stage 3 the pieces kept)
  grad_bytes       the most fp32 gradient memory held at any moment of the step: full bucket buffers alive
                   plus owned shards, read from every bucket (grad_buffer, None once freed) each time a function
                   of sharded_bucket.py returns: a buffer is created only inside one (allocate_grad_buffer), so
                   every moment just after one is created is read, before anything is freed. At stage 2 the full
                   buffers of the buckets being filled or reduced exist only for a moment, the end of a step
                   misses them. At stage 3: the owned pieces only, what a rank holds between units
  in_flight_bytes  stage 3: the most bytes of whole units at any moment, the gathered compute parameters (the
                   parameter buffer's storage, resized to nothing once freed; gathered only inside
                   gather_parameters) and the full fp32 gradient buffers together, read the same way; None at
                   stages 0-2
  optimizer_bytes  the fp32 master where it is a separate copy (not at fp32) + AdamW's exp_avg, exp_avg_sq
  bytes_sent       per rank per optimizer step, from the arguments of each call of torch.distributed.all_reduce,
                   reduce_scatter_single and all_gather_single (before torch 2.13: reduce_scatter_tensor and
                   all_gather_into_tensor, which now call the new names, so each call counts once), ring
                   convention: an all-reduce of B bytes sends 2 (N-1)/N x B, a reduce-scatter and an all-gather
                   (N-1)/N x B of the full buffer. (PyTorch's profiler records gloo's collectives too, but in
                   torch 2.13 without the group's size, and an all-reduce without its dtype.)
  step_seconds     median over the timed steps (the group waits at a barrier before and after each), and
                   tokens/s of the whole group
  peak_from_start_bytes
                   the most memory the rank held at any moment since its process started, construction
                   included (build_peak_bytes: the same, just after the model was built, before the first
                   step): each stage of our --dtype rows again, in processes of its own, built as
                   step12_fsdp/train.py builds it (on the meta device, each rank filling in only what it keeps)
                   and taking two optimizer steps; the process's max RSS on the CPU (max_memory_allocated on
                   CUDA). runtime_bytes: the same measure just before the model is built (the interpreter,
                   torch, gloo), so peak_above_runtime_bytes is what the training itself took. formula_bytes:
                   P + G + O of the ZeRO paper for the stage, from the parameter count (no activations, no
                   units in flight). The goal, on a model of 90M parameters or more at dp 4 (fp32): stage 3's
                   peak above the runtime <= 0.40x stage 0's (ideal about 0.30: (P + G + O)/4 plus what is in
                   flight); --peak_only measures these rows alone:

                     python tools/benchmark_zero.py --peak_only --dtype float32 --dp_sizes 4 --hidden_size 768 \
                         --intermediate_size 2048 --num_hidden_layers 12 --vocab_size 8192

The goal column holds each row against the ZeRO paper's accounting, taken from stage 0 at dp 1 (P, G, O its
param, grad and optimizer bytes): stage 0 P + G + O, stage 1 P + G + O/N, stage 2 P + (G + O)/N, stage 3
(P + G + O)/N, the units in flight beside it. A bucket never
splits a parameter, so at stage 2 the largest parameters bound the gradient buffers in flight
(MAX_REDUCTIONS_IN_FLIGHT reducing + the one backward fills): the default model is deep and narrow, with a
small vocabulary, so that its largest matrix is 0.6% of the weights and those buffers stay under 2% of the
gradient bytes (measured with hidden 512, 8 layers, vocabulary 4096, 29.4M parameters: the embedding is 7.1%
of the weights, 16 MB of buffers in flight are 14% of the gradients, and stage 2 sits 9.5% above the formula
at dp 4).

The anchor, at every dp size > 1: torch.distributed.optim.ZeroRedundancyOptimizer(optimizer_class=AdamW)
with DistributedDataParallel (same bucket size), against our stage 1, both in fp32 whatever --dtype: in
bf16 their recipe steps bf16 parameters with bf16 moments and no fp32 master, a different algorithm with
different losses, so fp32, where both run the same AdamW on the same weights, is the honest comparison of
losses and time. Their bytes sent are not counted (DDP's all-reduces are called from C++, where no Python hook
sees them) and neither are their gradients (DDP keeps its own buckets beside param.grad); their optimizer state is.

It measures, it never asserts (tests/test_benchmark_zero.py does). On a 2-core machine shared with other
work, the times are noisy; the bytes are exact.

    python tools/benchmark_zero.py                                  # bf16, dp 1 2 4, ~4 minutes on 2 cores
    python tools/benchmark_zero.py --plot assets/zero_memory.png    # and draw the memory per rank
    python tools/benchmark_zero.py --dtype float32 --dp_sizes 1 2 --json
"""
import argparse
import contextlib
import functools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.nn.parallel import DistributedDataParallel

from lib.measure import cpu_name, free_port, peak_rss_bytes
from lib.models import model_arguments, model_config
from lib.steps import use_step
from lib.watch import watch

use_step("step12_fsdp")
import process_group_manager as pgm  # noqa: E402
import sharded_bucket  # noqa: E402
from model import Llama  # noqa: E402
from optimizer import decay_groups  # noqa: E402
from sharded_bucket import MAX_REDUCTIONS_IN_FLIGHT  # noqa: E402
from zero import ZeroDataParallel  # noqa: E402
from zero_optimizer import ZeroAdamW  # noqa: E402

STAGES = (0, 1, 2, 3)
MB = 2**20


def parse_args():
    parser = model_arguments(__doc__)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=2)
    parser.add_argument("--bucket_size_mb", type=float, default=0.5, help="ours and DDP's bucket_cap_mb")
    parser.add_argument("--dp_sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16", help="our compute dtype")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps (after 1 warm-up step)")
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--json", action="store_true", help="print one JSON object per line instead of a table")
    parser.add_argument("--plot", default=None, help="draw the memory per rank into this PNG")
    parser.add_argument("--peak_only", action="store_true", help="only peak_from_start_bytes, per stage and dp size")
    return parser.parse_args()


def nbytes(tensor):
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


class MemoryMeter:
    """Live bytes of one model's fp32 gradients (full bucket buffers + owned shards) and of its whole units
    (stage 3's gathered parameters), and their maxima: the gradients alone, and the full buffers together
    with the whole units (what stage 3 holds in flight). read() looks at every bucket; the worker calls it at
    every return from a function of sharded_bucket.py while the step is watched."""

    def __init__(self, buckets):
        self.buckets = buckets
        self.shards = sum(nbytes(bucket.grad_shard) for bucket in buckets)
        self.peak_grad = self.peak_in_flight = 0
        self.read()

    def read(self, frame=None):
        full = sum(nbytes(bucket.grad_buffer) for bucket in self.buckets)  # full fp32 gradient buffers alive
        whole = sum(bucket.param_buffer.untyped_storage().nbytes()  # stage 3: gathered parameter buffers
                    for bucket in self.buckets if bucket.shards_params)
        self.peak_grad = max(self.peak_grad, self.shards + full)
        self.peak_in_flight = max(self.peak_in_flight, full + whole)


class SentBytes:
    """Bytes this rank sends in collectives, by the ring convention (what NCCL's ring sends; gloo's algorithms
    differ, see zero.py's docstring), counted from the arguments of each call: `calls` is what watch() takes."""

    # collective -> (its argument that is the full buffer, share of it each rank sends times N / (N - 1)). torch 2.13
    # renamed reduce_scatter_tensor and all_gather_into_tensor to *_single, and the old names call the new ones:
    # watching the newest name there is counts each call once, by whichever name it was made.
    COLLECTIVES = {dist.all_reduce: ("tensor", 2),
                   getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor): ("input", 1),
                   getattr(dist, "all_gather_single", dist.all_gather_into_tensor): ("output_tensor", 1)}

    def __init__(self):
        self.total = 0
        self.calls = {collective: functools.partial(self.count, buffer, share)
                      for collective, (buffer, share) in self.COLLECTIVES.items()}

    def count(self, buffer, share, arguments):
        num_ranks = dist.get_world_size(arguments["group"])
        self.total += share * (num_ranks - 1) * nbytes(arguments[buffer]) // num_ranks


def build_ours(config, zero_stage, dtype, args):
    torch.manual_seed(0)  # every contestant starts from the same weights
    model = ZeroDataParallel(Llama(config).to(dtype), zero_stage=zero_stage, bucket_size_mb=args.bucket_size_mb)
    return model, ZeroAdamW(model, lr=args.learning_rate)


def build_torch(config, group, args):
    torch.manual_seed(0)
    model = DistributedDataParallel(Llama(config), process_group=group, bucket_cap_mb=args.bucket_size_mb)
    # the same two groups as ours (AdamW's default decay, 0.01, on the matrices only)
    optimizer = ZeroRedundancyOptimizer(decay_groups(model.parameters(), weight_decay=0.01),
                                        optimizer_class=torch.optim.AdamW, process_group=group,
                                        lr=args.learning_rate)
    return model, optimizer


def train_step(kind, model, optimizer, micro_batches):
    """micro_batches: [grad_acc, micro_batch, seq + 1] tokens of this rank. Returns the local loss."""
    grad_acc = len(micro_batches)
    model.zero_grad()  # ours: also empties the gradient buckets
    acc_loss = 0.0
    for i, tokens in enumerate(micro_batches):
        last = i == grad_acc - 1
        if kind == "ours":
            model.require_backward_grad_sync = last
        # DDP all-reduces in the backward of the last micro-batch only, as ours reduces (stages 0, 1) then.
        with model.no_sync() if kind == "torch" and not last else contextlib.nullcontext():
            logits = model(tokens[:, :-1])  # [batch, seq, vocab]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))
            loss = loss / grad_acc
            loss.backward()
        acc_loss += loss.item()
    if kind == "ours":
        model.finish_gradient_synchronization()
    optimizer.step()
    if kind == "ours":
        # The all-gathers of stages 1, 2 would run on into this contestant's next forward; the contestants take
        # turns step by step, so each step is closed here and the gathers are timed with the step that started them.
        model.finish_parameter_gathers()
    return acc_loss


def ours_memory(model, optimizer, meter):
    buckets = model.buckets
    moments = sum(nbytes(state[key]) for state in optimizer.optimizer.state.values()
                  for key in ("exp_avg", "exp_avg_sq"))
    sharded = model.stage.shards_parameters  # between units: the owned pieces; the whole units are in_flight_bytes
    return {"param_bytes": sum(nbytes(b.param_shard) if b.shards_params else nbytes(b.param_buffer) for b in buckets),
            "grad_bytes": meter.shards if sharded else meter.peak_grad,
            "in_flight_bytes": meter.peak_in_flight if sharded else None,
            "optimizer_bytes": moments + sum(nbytes(b.master) for b in buckets if not b.master_is_param),
            "grad_shard_bytes": sum(nbytes(bucket.grad_shard) for bucket in buckets),
            "largest_bucket_bytes": max(bucket.padded_numel for bucket in buckets) * 4,  # its fp32 buffer
            "num_buckets": len(buckets)}


def torch_memory(model, optimizer):
    moments = sum(nbytes(state[key]) for state in optimizer.optim.state.values() for key in ("exp_avg", "exp_avg_sq"))
    return {"param_bytes": sum(nbytes(p) for p in model.parameters()), "grad_bytes": None, "in_flight_bytes": None,
            "optimizer_bytes": moments}  # fp32: the master is the parameter


def worker(rank, dp_size, port, args, result_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=dp_size)
    pgm.setup_process_group_manager(tp_size=1, cp_size=1, pp_size=1, dp_size=dp_size)
    group = pgm.process_group_manager.cp_dp_group
    config = model_config(args)
    dtype = getattr(torch, args.dtype)

    # (kind, zero stage, dtype): our three stages, then the fp32 pair that compares with PyTorch's ZeRO-1
    contestants = [("ours", stage, args.dtype) for stage in STAGES]
    if dp_size > 1:
        if dtype != torch.float32:
            contestants.append(("ours", 1, "float32"))
        contestants.append(("torch", 1, "float32"))
    built = {}
    for key in contestants:
        kind, stage, dtype_name = key
        if kind == "ours":
            model, optimizer = build_ours(config, zero_stage=stage, dtype=getattr(torch, dtype_name), args=args)
            built[key] = model, optimizer, MemoryMeter(model.buckets)
        else:
            built[key] = (*build_torch(config, group, args), None)
    sent = {key: SentBytes() for key in contestants if key[0] == "ours"}
    num_params = sum(p.numel() for p in built[contestants[0]][0].parameters())

    generator = torch.Generator().manual_seed(1)
    # [steps, grad_acc, dp, micro_batch, seq + 1]: the same global batches for every contestant
    batches = torch.randint(config.vocab_size, (1 + args.steps, args.gradient_accumulation_steps, dp_size,
                                                args.micro_batch_size, args.seq_len + 1), generator=generator)
    losses = {key: [] for key in contestants}
    seconds = {key: [] for key in contestants}
    for step in range(1 + args.steps):  # step 0 warms up, and ours are watched in it
        shift = step % len(contestants)
        for key in contestants[shift:] + contestants[:shift]:
            model, optimizer, meter = built[key]
            watched = step == 0 and meter is not None
            dist.barrier()
            start = time.perf_counter()
            with watch(calls=sent[key].calls, returns=(sharded_bucket.__file__, meter.read)) if watched \
                    else contextlib.nullcontext():
                losses[key].append(train_step(key[0], model, optimizer, micro_batches=batches[step, :, rank]))
            dist.barrier()
            if step:
                seconds[key].append(time.perf_counter() - start)

    results = []
    for key in contestants:
        kind, stage, dtype_name = key
        model, optimizer, meter = built[key]
        memory = ours_memory(model, optimizer, meter) if kind == "ours" else torch_memory(model, optimizer)
        results.append({"contestant": kind, "zero_stage": stage, "dtype": dtype_name, "dp_size": dp_size,
                        "num_params": num_params, **memory,
                        "bytes_sent": sent[key].total if kind == "ours" else None,
                        "step_seconds": seconds[key], "losses": losses[key]})
    (Path(result_dir) / f"{dp_size}_{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def peak_worker(rank, dp_size, port, stage, args, result_dir):
    """One zero stage in fresh processes, built as train.py builds it, two optimizer steps: the rank's peak memory
    from process start, and the runtime's own just before the model is built."""
    from train import build_model  # train.py's imports (the data pipeline among them) count as the runtime's

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=dp_size)
    pgm.setup_process_group_manager(tp_size=1, cp_size=1, pp_size=1, dp_size=dp_size)
    config = model_config(args)
    batches = torch.randint(config.vocab_size, (2, args.gradient_accumulation_steps, dp_size, args.micro_batch_size,
                                                args.seq_len + 1), generator=torch.Generator().manual_seed(1))
    runtime = peak_rss_bytes()
    run = argparse.Namespace(seed=0, init_from_hf=None, zero_stage=stage, bucket_size_mb=args.bucket_size_mb,
                             learning_rate=args.learning_rate, weight_decay=0.01)
    model, optimizer = build_model(run, config, torch.device("cpu"), getattr(torch, args.dtype))
    built = peak_rss_bytes()
    for step in range(2):  # AdamW's moments exist from the first step on
        train_step("ours", model, optimizer, micro_batches=batches[step, :, rank])
    result = {"peak_from_start_bytes": peak_rss_bytes(), "runtime_bytes": runtime, "build_peak_bytes": built}
    (Path(result_dir) / f"peak_{dp_size}_{stage}_{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def measure_peaks(args, result_dir):
    """{(dp_size, stage): the fullest rank's peak_from_start_bytes, runtime_bytes, peak_above_runtime_bytes}.
    The workers' glibc hands every freed buffer of 64 KiB or more back to the system at once
    (MALLOC_MMAP_THRESHOLD_), so that the max RSS follows what was alive, as max_memory_allocated does on CUDA.
    By default glibc keeps freed memory for reuse, and a ZeRO-3 step, which allocates and frees a unit's buffers
    over and over, then reads 2.5x higher (measured: 1687 against 651 MB at 90M parameters, dp 4)."""
    peaks = {}
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)  # read by the spawned interpreters as they start
    for dp_size in args.dp_sizes:
        for stage in STAGES:
            mp.spawn(peak_worker, args=(dp_size, free_port(), stage, args, result_dir), nprocs=dp_size)
            ranks = [json.loads((Path(result_dir) / f"peak_{dp_size}_{stage}_{rank}.json").read_text())
                     for rank in range(dp_size)]
            fullest = max(ranks, key=lambda r: r["peak_from_start_bytes"] - r["runtime_bytes"])
            peaks[dp_size, stage] = {**fullest, "peak_above_runtime_bytes":
                                     fullest["peak_from_start_bytes"] - fullest["runtime_bytes"],
                                     "build_above_runtime_bytes":
                                     fullest["build_peak_bytes"] - fullest["runtime_bytes"]}
    del os.environ["MALLOC_MMAP_THRESHOLD_"]
    return peaks


def formula_bytes(num_params, stage, dp_size, dtype):
    """P + G + O of the ZeRO paper per rank: compute parameters, fp32 gradients, fp32 master (unless fp32) + moments."""
    P = num_params * torch.empty((), dtype=getattr(torch, dtype)).element_size()
    G, O = 4 * num_params, (8 if dtype == "float32" else 12) * num_params
    return (P + G + O, P + G + O / dp_size, P + (G + O) / dp_size, (P + G + O) / dp_size)[stage]


def print_peaks(peaks, num_params, args):
    print(f"peak memory per rank from process start ({cpu_name()}, max RSS), {num_params / 1e6:.1f}M parameters, "
          f"{args.dtype}; build: the peak once the model is built, and above: after two steps, both minus the "
          f"runtime's (the RSS just before the model was built)")
    print(f"{'stage':>5} {'dp':>3} {'peak MB':>8} {'runtime MB':>10} {'build MB':>9} {'above MB':>9} "
          f"{'formula MB':>10} {'above/stage 0':>13}")
    for (dp_size, stage), peak in peaks.items():
        stage0 = peaks.get((dp_size, 0))
        ratio = peak["peak_above_runtime_bytes"] / stage0["peak_above_runtime_bytes"] if stage0 else float("nan")
        goal = "  (goal <= 0.40 at 90M+ params, dp 4)" if stage == 3 else ""
        print(f"{stage:>5} {dp_size:>3} {peak['peak_from_start_bytes'] / MB:>8.1f} {peak['runtime_bytes'] / MB:>10.1f} "
              f"{peak['build_above_runtime_bytes'] / MB:>9.1f} {peak['peak_above_runtime_bytes'] / MB:>9.1f} "
              f"{formula_bytes(num_params, stage, dp_size, args.dtype) / MB:>10.1f} {ratio:>13.3f}{goal}")


def merge_ranks(per_rank, tokens_per_step):
    """One row from every rank's result of one contestant: the fullest rank's bytes (what must fit), the
    slowest rank's time per step, the loss averaged over the ranks (the loss of the global batch)."""
    row = dict(per_rank[0])
    for key in ("param_bytes", "grad_bytes", "optimizer_bytes", "grad_shard_bytes", "in_flight_bytes", "bytes_sent"):
        if row.get(key) is not None:
            row[key] = max(r[key] for r in per_rank)
    row["step_times"] = [max(times) for times in zip(*(r["step_seconds"] for r in per_rank))]  # per step, slowest
    row["step_seconds"] = statistics.median(row["step_times"])
    row["tokens_per_second"] = tokens_per_step * row["dp_size"] / row["step_seconds"]
    row["losses"] = [statistics.fmean(step) for step in zip(*(r["losses"] for r in per_rank))]
    return row


def add_expected(rows, dtype):
    """expected_total_bytes: the ZeRO paper's accounting from P, G, O of stage 0 at dp 1."""
    base = next((r for r in rows if r["contestant"] == "ours" and r["dtype"] == dtype and r["zero_stage"] == 0
                 and r["dp_size"] == 1), None)
    for row in rows:
        expected = None
        if base and row["contestant"] == "ours" and row["dtype"] == dtype:
            P, G, O, N = base["param_bytes"], base["grad_bytes"], base["optimizer_bytes"], row["dp_size"]
            expected = (P + G + O, P + G + O / N, P + (G + O) / N, (P + G + O) / N)[row["zero_stage"]]
        row["expected_total_bytes"] = expected


def total_bytes(row):
    return row["param_bytes"] + row["grad_bytes"] + row["optimizer_bytes"]


def print_table(rows, args):
    ours = [r for r in rows if r["contestant"] == "ours" and r["dtype"] == args.dtype]
    first = ours[0]
    grads = first["num_params"] * 4
    in_flight = (MAX_REDUCTIONS_IN_FLIGHT + 1) * first["largest_bucket_bytes"]
    print(f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, gloo | {first['num_params'] / 1e6:.1f}M "
          f"parameters: hidden {args.hidden_size}, intermediate {args.intermediate_size}, {args.num_hidden_layers} "
          f"layers, vocab {args.vocab_size} | {args.dtype} compute, fp32 gradients and AdamW | seq_len {args.seq_len}, "
          f"micro_batch {args.micro_batch_size}, grad_acc {args.gradient_accumulation_steps} | {args.steps} timed "
          f"steps after 1 warm-up")
    print(f"buckets of at most {args.bucket_size_mb} MB (a larger parameter gets its own): {first['num_buckets']} "
          f"at dp 1, the largest {first['largest_bucket_bytes'] / MB:.2f} MB; stage 2 holds at most "
          f"{MAX_REDUCTIONS_IN_FLIGHT + 1} full buffers ({MAX_REDUCTIONS_IN_FLIGHT} reducing + the one backward "
          f"fills) = {in_flight / MB:.2f} MB = {in_flight / grads:.2%} of the {grads / MB:.1f} MB of fp32 gradients")
    base = next((r for r in ours if r["zero_stage"] == 0 and r["dp_size"] == 1), None)
    if base:
        print(f"P, G, O (stage 0, dp 1): {base['param_bytes'] / MB:.1f}, {base['grad_bytes'] / MB:.1f}, "
              f"{base['optimizer_bytes'] / MB:.1f} MB | expected per rank: stage 0 P + G + O, stage 1 P + G + O/N, "
              f"stage 2 P + (G + O)/N, stage 3 (P + G + O)/N and the whole units in flight beside it (not in the "
              f"total) | sent/G: bytes sent per step over G")
    print(f"{'stage':>5} {'dp':>3} {'params MB':>10} {'grads MB':>9} {'optim MB':>9} {'total MB':>9} "
          f"{'expected':>9} {'ratio':>6} {'goal':>5} {'in flight':>9} {'sent MB':>8} {'sent/G':>7} {'ms/step':>8} "
          f"{'tokens/s':>9}")
    for row in ours:
        expected, total = row["expected_total_bytes"], total_bytes(row)
        goal = f"{'-':>9} {'-':>6} {'-':>5}"  # no stage 0 at dp 1 to take P, G, O from
        if expected:
            verdict = "ok" if abs(total / expected - 1) <= 0.05 else "MISS"
            goal = f"{expected / MB:>9.1f} {total / expected:>6.3f} {verdict:>5}"
        in_flight = "-" if row["in_flight_bytes"] is None else f"{row['in_flight_bytes'] / MB:.1f}"
        print(f"{row['zero_stage']:>5} {row['dp_size']:>3} {row['param_bytes'] / MB:>10.1f} "
              f"{row['grad_bytes'] / MB:>9.1f} {row['optimizer_bytes'] / MB:>9.1f} {total / MB:>9.1f} {goal} "
              f"{in_flight:>9} {row['bytes_sent'] / MB:>8.1f} {row['bytes_sent'] / grads:>7.3f} "
              f"{row['step_seconds'] * 1000:>8.0f} "
              f"{row['tokens_per_second']:>9.0f}")

    pairs = [(ours_row, theirs) for theirs in rows if theirs["contestant"] == "torch"
             for ours_row in rows if ours_row["contestant"] == "ours" and ours_row["dtype"] == "float32"
             and ours_row["zero_stage"] == 1 and ours_row["dp_size"] == theirs["dp_size"]]
    if not pairs:
        return
    print("vs PyTorch's ZeRO-1, ZeroRedundancyOptimizer(AdamW) + DistributedDataParallel: both fp32, same weights, "
          "batches and bucket size; losses averaged over the ranks, warm-up step first")
    print("ours/torch: the median of the per-step ratios (the two take turns step by step, so load that comes and "
          "goes lands on both), and their range")
    print(f"{'dp':>3} {'ours ms':>8} {'torch ms':>9} {'ours/torch':>10} {'range':>11} {'optim MB ours':>13} "
          f"{'torch':>6} {'max |dloss|':>11}  losses ours | torch")
    for ours_row, theirs in pairs:
        diff = max(abs(a - b) for a, b in zip(ours_row["losses"], theirs["losses"]))
        ratios = [a / b for a, b in zip(ours_row["step_times"], theirs["step_times"])]
        print(f"{ours_row['dp_size']:>3} {ours_row['step_seconds'] * 1000:>8.0f} {theirs['step_seconds'] * 1000:>9.0f} "
              f"{statistics.median(ratios):>10.3f} {min(ratios):>5.2f}-{max(ratios):<5.2f} "
              f"{ours_row['optimizer_bytes'] / MB:>13.1f} {theirs['optimizer_bytes'] / MB:>6.1f} {diff:>11.2e}  "
              f"{' '.join(f'{x:.5f}' for x in ours_row['losses'])} | {' '.join(f'{x:.5f}' for x in theirs['losses'])}")


def plot(rows, path, dtype):
    """Stacked bars params / grads / optimizer per stage, grouped by dp size, each beside an outlined bar as
    tall as the formula's total; at stage 3 a hatched segment on top: the whole units in flight."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ours = [r for r in rows if r["contestant"] == "ours" and r["dtype"] == dtype]
    dp_sizes = sorted({r["dp_size"] for r in ours})
    fig, ax = plt.subplots(figsize=(11, 4.8))
    width, ticks, labels = 0.32, [], []
    for group_index, dp_size in enumerate(dp_sizes):
        for row in (r for r in ours if r["dp_size"] == dp_size):
            x = group_index * (len(STAGES) + 1) + row["zero_stage"]
            bottom = 0
            for key, color, label in (("param_bytes", "#4c72b0", "parameters"), ("grad_bytes", "#dd8452", "gradients"),
                                      ("optimizer_bytes", "#55a868", "fp32 master + AdamW moments")):
                ax.bar(x, row[key] / MB, width, bottom=bottom, color=color, label=label if x == 0 else None)
                bottom += row[key] / MB
            if row["in_flight_bytes"]:
                ax.bar(x, row["in_flight_bytes"] / MB, width, bottom=bottom, color="white", edgecolor="#8172b3",
                       hatch="///", label="stage 3: whole units in flight" if row["zero_stage"] == 3 and
                       group_index == len(dp_sizes) - 1 else None)
            if row["expected_total_bytes"]:
                ax.bar(x + width, row["expected_total_bytes"] / MB, width, fill=False, linestyle="--",
                       edgecolor="black", label="ZeRO paper's formula" if x == 0 else None)
                ax.annotate(f"{total_bytes(row) / row['expected_total_bytes']:.3f}", (x + width / 2, bottom),
                            ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
            ticks.append(x + width / 2)
            labels.append(f"stage {row['zero_stage']}\ndp {dp_size}")
    ax.set_xticks(ticks, labels, fontsize=8)
    ax.set_ylabel("MB per rank")
    ax.set_ylim(0, ax.get_ylim()[1] * 1.15)  # room for the legend above the tallest bars
    num_params = ours[0]["num_params"]
    ax.set_title(f"ZeRO memory per rank, {num_params / 1e6:.1f}M parameters, {dtype} compute "
                 f"(measured; numbers: measured / formula)", fontsize=10)
    ax.legend(fontsize=8, ncol=5, loc="upper center")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    args = parse_args()
    tokens_per_step = args.gradient_accumulation_steps * args.micro_batch_size * args.seq_len  # per rank
    rows = []
    with tempfile.TemporaryDirectory() as result_dir:
        for dp_size in [] if args.peak_only else args.dp_sizes:
            mp.spawn(worker, args=(dp_size, free_port(), args, result_dir), nprocs=dp_size)
            per_rank = [json.loads((Path(result_dir) / f"{dp_size}_{rank}.json").read_text())
                        for rank in range(dp_size)]
            rows += [merge_ranks(list(contestant), tokens_per_step) for contestant in zip(*per_rank)]
        peaks = measure_peaks(args, result_dir)
    with torch.device("meta"):
        num_params = sum(param.numel() for param in Llama(model_config(args)).parameters())
    if args.peak_only:  # a row per stage and dp size, with the peaks only
        rows = [{"contestant": "ours", "zero_stage": stage, "dtype": args.dtype, "dp_size": dp_size,
                 "num_params": num_params} for dp_size, stage in peaks]
    add_expected(rows, args.dtype)
    for row in rows:
        peak = peaks.get((row["dp_size"], row["zero_stage"])) if row["contestant"] == "ours" and \
            row["dtype"] == args.dtype else None
        row.update(peak or dict.fromkeys(("peak_from_start_bytes", "runtime_bytes", "build_peak_bytes",
                                          "peak_above_runtime_bytes", "build_above_runtime_bytes")))
        row["formula_bytes"] = formula_bytes(num_params, row["zero_stage"], row["dp_size"], args.dtype) if peak \
            else None
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        if not args.peak_only:
            print_table(rows, args)
        print_peaks(peaks, num_params, args)
    if args.plot:
        plot(rows, args.plot, args.dtype)


if __name__ == "__main__":
    main()
