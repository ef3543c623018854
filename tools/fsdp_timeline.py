"""When each unit of step 12's ZeRO-3 is whole, measured: one training step at dp 2 on the CPU (gloo), with
every gather, wait and free of every unit timestamped, drawn as one row per unit. The times are read from the
outside, as each function of step12_fsdp/sharded_bucket.py returns (tools/lib/watch.py, Python's profiler hook;
nothing of step 12 is replaced), from what the buckets hold then (UnitEvents).

    python tools/fsdp_timeline.py                                   # draws assets/fsdp_timeline.png
    python tools/fsdp_timeline.py --num_hidden_layers 2 --out /tmp/t.png --json

Each row is a unit (the embedding, the decoder layers, the final norm with the LM head). A light bar runs from
the start of the unit's all-gather to the end of the wait for it (the prefetch: it starts while the unit
before computes), a dark bar from there to the free: the time the unit's full parameters exist. The strip
below counts the units whose full buffer holds memory at each moment, being gathered or whole (never more
than two: one computes while the next is gathered). The embedding is gathered for its forward only (its backward
reads no weight), and the norm with the LM head stays whole from its forward into its backward. The step measured
is the second of the run, after a warm-up step; the times are rank 0's.

    python tools/fsdp_timeline.py --zero_stage 1                    # draws assets/zero1_gather_overlap.png

ZeRO-1 and 2 instead (steps 11, 12): the optimizer step of the second step and the forward after it, one row per
bucket in the order the forward uses them. A light bar runs from the start of the bucket's all-gather of updated
parameters (ZeroAdamW.step starts them all, in that order, and does not wait) to the end of the wait for it, just
before the first module that uses the bucket computes. Where the wait ends one layer's compute after the one
before, it did not wait: the later buckets arrive while the first layers compute.
"""
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from lib.measure import free_port
from lib.models import model_arguments, model_config
from lib.steps import ROOT, use_step
from lib.watch import watch

use_step("step12_fsdp")
import process_group_manager as pgm  # noqa: E402
import sharded_bucket  # noqa: E402
import zero  # noqa: E402
from zero_optimizer import ZeroAdamW  # noqa: E402
from model import Llama  # noqa: E402

DP_SIZE = 2


def parse_args():
    parser = model_arguments(__doc__, hidden_size=512, intermediate_size=1536, num_hidden_layers=6, vocab_size=4096,
                             seq_len=256, micro_batch_size=2)
    parser.add_argument("--zero_stage", type=int, choices=(1, 2, 3), default=3)
    parser.add_argument("--bucket_size_mb", type=float, default=2.0, help="stages 1, 2: the buckets' size")
    parser.add_argument("--out", default=None, help="the picture (default: assets/fsdp_timeline.png at stage 3, "
                                                    "assets/zero1_gather_overlap.png at stages 1, 2)")
    parser.add_argument("--json", action="store_true", help="also print the events as JSON")
    return parser.parse_args()


class UnitEvents:
    """(bucket, what, seconds) each time a bucket's parameters change state: "gather" when an all-gather of them
    starts (the bucket's gather_handle appears), "whole" when the wait for it ends (the handle goes, the buffer
    has its memory), "free" when the memory of the full parameters is given back (the buffer's storage resized to
    nothing). read() compares every bucket with what it saw last; the workers call it at every return from a
    function of sharded_bucket.py (tools/lib/watch.py), where those changes are made: step 12 is not changed,
    and each change is seen as the function that made it returns."""

    def __init__(self, buckets):
        self.buckets = buckets
        self.events = []
        self.states = {bucket: self.state(bucket) for bucket in buckets}

    @staticmethod
    def state(bucket):
        """(an all-gather of its parameters in flight, its full parameter buffer holds memory)"""
        return bucket.gather_handle is not None, bucket.param_buffer.untyped_storage().size() > 0

    def read(self, frame=None):
        seconds = time.perf_counter()
        for bucket in self.buckets:
            (was_pending, had_memory), (pending, has_memory) = self.states[bucket], self.state(bucket)
            if pending and not was_pending:
                self.events.append((bucket, "gather", seconds))
            elif was_pending and not pending and has_memory:
                self.events.append((bucket, "whole", seconds))
            if had_memory and not has_memory:
                self.events.append((bucket, "free", seconds))
            self.states[bucket] = pending, has_memory


def gather_worker(rank, port, args, result_dir):
    """Stages 1, 2: a warm-up step, a second step's forward and backward, then its optimizer step and the next
    forward timed."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=DP_SIZE)
    pgm.setup_process_group_manager(tp_size=1, cp_size=1, pp_size=1, dp_size=DP_SIZE)
    config = model_config(args)
    torch.manual_seed(0)
    model = zero.ZeroDataParallel(Llama(config), zero_stage=args.zero_stage, bucket_size_mb=args.bucket_size_mb)
    optimizer = ZeroAdamW(model, lr=1e-3)
    names = {param: name for name, param in model.module.named_parameters()}
    watched = UnitEvents(model.buckets)
    events = watched.events
    generator = torch.Generator().manual_seed(1 + rank)

    def forward():
        tokens = torch.randint(config.vocab_size, (args.micro_batch_size, args.seq_len + 1), generator=generator)
        logits = model(input_ids=tokens[:, :-1])  # [batch, seq, vocab]
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))

    with watch(returns=(sharded_bucket.__file__, watched.read)):
        for step in range(2):  # the first warms up
            model.zero_grad()
            forward().backward()
            model.finish_gradient_synchronization()
            dist.barrier()
            events.clear()
            start = time.perf_counter()
            optimizer.step()
            step_end = time.perf_counter()
            model.zero_grad()
            loss = forward()
            forward_end = time.perf_counter()
            loss.backward()  # (so that the next step has its gradients)
    if rank == 0:
        first_use = sorted(model.buckets, key=lambda bucket: min(
            (seconds for unit, what, seconds in events if unit is bucket and what == "whole"), default=float("inf")))
        units = {bucket: index for index, bucket in enumerate(first_use)}
        result = {"units": [f"bucket {index}: {names[bucket.params[-1]]}" + (" ..." if len(bucket.params) > 1 else "")
                            for index, bucket in enumerate(first_use)],
                  "phases": {"optimizer": (0.0, step_end - start), "forward": (step_end - start, forward_end - start)},
                  "events": [(units[bucket], what, seconds - start) for bucket, what, seconds in events]}
        (Path(result_dir) / "timeline.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def worker(rank, port, args, result_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=DP_SIZE)
    pgm.setup_process_group_manager(tp_size=1, cp_size=1, pp_size=1, dp_size=DP_SIZE)
    config = model_config(args)
    torch.manual_seed(0)
    model = zero.ZeroDataParallel(Llama(config), zero_stage=3)
    optimizer = ZeroAdamW(model, lr=1e-3)
    units = {bucket: index for index, bucket in enumerate(model.buckets)}
    watched = UnitEvents(model.buckets)
    events = watched.events
    generator = torch.Generator().manual_seed(1 + rank)
    phases = {}
    with watch(returns=(sharded_bucket.__file__, watched.read)):
        for step in range(2):  # the first warms up
            events.clear()
            tokens = torch.randint(config.vocab_size, (args.micro_batch_size, args.seq_len + 1), generator=generator)
            dist.barrier()
            start = time.perf_counter()
            model.zero_grad()
            logits = model(input_ids=tokens[:, :-1])  # [batch, seq, vocab]
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
            forward_end = time.perf_counter()
            loss.backward()
            model.finish_gradient_synchronization()
            backward_end = time.perf_counter()
            optimizer.step()
            phases = {"forward": (0.0, forward_end - start), "backward": (forward_end - start, backward_end - start),
                      "optimizer": (backward_end - start, time.perf_counter() - start)}
    if rank == 0:
        result = {"units": ["embedding", *[f"layer {i}" for i in range(config.num_hidden_layers)], "norm + LM head"],
                  "phases": phases,
                  "events": [(units[bucket], what, seconds - start) for bucket, what, seconds in events]}
        (Path(result_dir) / "timeline.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def units_in_memory(events):
    """[(seconds, units whose full buffer holds memory from then on)] and the most at any moment: a unit's
    buffer is allocated when its gather starts and given back when it is freed."""
    counts, held = [], 0
    for _, what, seconds in sorted(events, key=lambda event: event[2]):
        held += {"gather": 1, "free": -1}.get(what, 0)
        counts.append((seconds, held))
    return counts, max((count for _, count in counts), default=0)


def draw(result, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    units, events = result["units"], result["events"]
    fig, (ax, strip) = plt.subplots(2, 1, figsize=(11, 1.2 + 0.45 * len(units)), sharex=True,
                                    gridspec_kw={"height_ratios": [len(units), 2]})
    colors = {"forward": "#dbe9f6", "backward": "#fde2cf", "optimizer": "#e3f1de"}
    for phase, (begin, end) in result["phases"].items():
        for axis in (ax, strip):
            axis.axvspan(begin * 1000, end * 1000, color=colors[phase], zorder=0)
        strip.text((begin + end) * 500, 2.6, phase, ha="center", va="bottom", fontsize=8)
    for index in range(len(units)):
        mine = sorted((seconds, what) for unit, what, seconds in events if unit == index)
        gather_start = None
        whole_since = None
        for seconds, what in mine:
            if what == "gather":
                gather_start = seconds
            elif what == "whole":
                if gather_start is not None:
                    ax.barh(index, (seconds - gather_start) * 1000, left=gather_start * 1000, height=0.5,
                            color="#9ecae1", label="all-gather in flight" if index == 0 else None)
                gather_start, whole_since = None, seconds
            elif what == "free" and whole_since is not None:
                ax.barh(index, (seconds - whole_since) * 1000, left=whole_since * 1000, height=0.5, color="#08519c",
                        label="full parameters exist" if index == 0 else None)
                whole_since = None
    ax.set_yticks(range(len(units)), units, fontsize=8)
    ax.invert_yaxis()
    ax.set_ylim(len(units) - 0.3, -0.7)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=8, loc="upper center", ncol=2)
    counts, most = units_in_memory(events)
    strip.step([seconds * 1000 for seconds, _ in counts], [count for _, count in counts], where="post", color="black")
    strip.set_ylim(0, max(most, 2) + 1.3)
    strip.set_yticks(range(max(most, 2) + 1))
    strip.set_ylabel("units in\nmemory", fontsize=8)
    strip.set_xlabel("ms since the step began (rank 0)")
    ax.set_title(f"ZeRO-3, dp {DP_SIZE}, one training step: when each unit's full parameters exist (measured; at "
                 f"most {most} units in memory at once)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def draw_gathers(result, path, zero_stage):
    """Stages 1, 2: a row per bucket, its all-gather from start to the end of the wait, over the two phases."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    units, events = result["units"], result["events"]
    fig, ax = plt.subplots(figsize=(11, 1.4 + 0.32 * len(units)))
    colors = {"forward": "#dbe9f6", "optimizer": "#e3f1de"}
    for phase, (begin, end) in result["phases"].items():
        ax.axvspan(begin * 1000, end * 1000, color=colors[phase], zorder=0)
        ax.text((begin + end) * 500, -0.9, phase, ha="center", va="bottom", fontsize=8)
    for index in range(len(units)):
        started = [seconds for unit, what, seconds in events if unit == index and what == "gather"]
        waited = [seconds for unit, what, seconds in events if unit == index and what == "whole"]
        if started and waited:
            ax.barh(index, (waited[0] - started[0]) * 1000, left=started[0] * 1000, height=0.5, color="#9ecae1",
                    label="from the start of its all-gather to its first use" if index == 0 else None)
            ax.plot([waited[0] * 1000] * 2, [index - 0.3, index + 0.3], color="#08519c", linewidth=2,
                    label="first use: the wait for it ends" if index == 0 else None)
    ax.set_yticks(range(len(units)), units, fontsize=7)
    ax.set_ylim(len(units) - 0.3, -1.2)
    ax.set_xlabel("ms since the optimizer step began (rank 0)")
    ax.legend(fontsize=8, loc="upper right")
    ax.set_title(f"ZeRO-{zero_stage}, dp {DP_SIZE} (measured): the optimizer step starts every bucket's all-gather, "
                 f"the forward waits for each\njust before its first use; only the first wait is long, the later "
                 f"gathers ended while earlier layers computed", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    args = parse_args()
    sharded = args.zero_stage == 3
    args.out = args.out or str(ROOT / "assets" / ("fsdp_timeline.png" if sharded else "zero1_gather_overlap.png"))
    with tempfile.TemporaryDirectory() as result_dir:
        mp.spawn(worker if sharded else gather_worker, args=(free_port(), args, result_dir), nprocs=DP_SIZE)
        result = json.loads((Path(result_dir) / "timeline.json").read_text())
    if not sharded:
        draw_gathers(result, args.out, args.zero_stage)
        print(f"{len(result['units'])} buckets; drawn into {os.path.relpath(args.out)}")
        if args.json:
            print(json.dumps(result))
        return
    _, most = units_in_memory(result["events"])
    result["most_units_in_memory"] = most
    draw(result, args.out)
    print(f"{len(result['units'])} units, at most {most} in memory at once; drawn into {os.path.relpath(args.out)}")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
