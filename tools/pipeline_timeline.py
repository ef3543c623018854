"""The pipeline bubble as a picture: when each stage ran each micro-batch's forward and backward, AFAB
against 1F1B, measured in real runs.

Runs step8's train.py under torchrun once per schedule with PIPELINE_TIMELINE set, so pipeline_parallel.py
records the start and end of every forward and backward on every stage. For the last optimizer step of each
run it draws one row per stage, a box per micro-batch forward (F) and backward (B), the gaps between them
idle, and prints each stage's order of work, its measured idle fraction beside the ideal bubble
(p - 1) / (m + p - 1) for p stages and m micro-batches, and the most micro-batches of activations it held.

    python tools/pipeline_timeline.py                   # pp 4, 8 micro-batches -> assets/pipeline_timeline.png
    python tools/pipeline_timeline.py --pp_size 2 --gradient_accumulation_steps 4 --output /tmp/timeline.png

With more processes than free cores (4 stages on a 2-core laptop) the operating system time-slices the
stages, so boxes stretch and idle time shrinks or grows with the load: the shape is the schedule's, the
exact fractions are the machine's.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEP = ROOT / "step8_pipeline_parallel_1f1b"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pp_size", type=int, default=4)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=8, help="micro-batches per step")
    parser.add_argument("--micro_batch_size", type=int, default=2)
    parser.add_argument("--seq_len", type=int, default=128)
    # 7 layers on 4 stages: 2, 2, 2, and 1 plus the LM head (about 1.3 layers of matmuls on the tiny model),
    # so the stages do about equal work and the picture shows the schedule, not an unbalanced split.
    parser.add_argument("--num_hidden_layers", type=int, default=7)
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per run; the last one is drawn")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda needs pp_size GPUs")
    parser.add_argument("--engines", nargs="+", choices=["afab", "1f1b"], default=["afab", "1f1b"])
    parser.add_argument("--output", type=Path, default=ROOT / "assets" / "pipeline_timeline.png")
    parser.add_argument("--json", type=Path, default=None, help="also write the per-stage numbers here")
    return parser.parse_args()


def record(args, engine, timeline_dir):
    """Run one schedule with the timeline on; returns every stage's events, sorted by start."""
    tokens_per_step = args.gradient_accumulation_steps * args.micro_batch_size * args.seq_len
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.pp_size}",
               str(STEP / "train.py"), "--pp_size", str(args.pp_size), "--pp_engine", engine,
               "--gradient_accumulation_steps", str(args.gradient_accumulation_steps),
               "--micro_batch_size", str(args.micro_batch_size), "--seq_len", str(args.seq_len),
               "--num_hidden_layers", str(args.num_hidden_layers), "--max_tokens", str(args.steps * tokens_per_step),
               "--device", args.device]
    env = {**os.environ, "PIPELINE_TIMELINE": str(timeline_dir)}
    env.pop("VERBOSE", None)  # printing every send/recv would be timed too
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"error: the {engine} run failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    events = [json.loads(line) for path in timeline_dir.glob("rank_*.jsonl") for line in path.read_text().splitlines()]
    return sorted(events, key=lambda event: event["start"])


def last_step(events, pp_size, micro_batches):
    """Each stage's events of the last optimizer step, labelled with their micro-batch. Both schedules run a
    stage's forwards in micro-batch order and its backwards oldest first, so the k-th forward (and the k-th
    backward) of a step is micro-batch k."""
    stages = []
    for stage in range(pp_size):
        mine = [event for event in events if event["stage"] == stage]
        step = []
        for kind in ("forward", "backward"):
            of_kind = [event for event in mine if event["kind"] == kind]
            for micro_batch, event in enumerate(of_kind[-micro_batches:]):
                step.append({**event, "micro_batch": micro_batch})
        stages.append(sorted(step, key=lambda event: event["start"]))
    return stages


def summarize(stages):
    """Per stage: the order of work, busy seconds, idle fraction of the step, most micro-batches held."""
    step_start = min(event["start"] for stage in stages for event in stage)
    step_seconds = max(event["end"] for stage in stages for event in stage) - step_start
    rows = []
    for stage, events in enumerate(stages):
        busy = sum(event["end"] - event["start"] for event in events)
        held = peak_held = 0  # a micro-batch's activations are held from its forward until its backward
        for event in events:
            held += 1 if event["kind"] == "forward" else -1
            peak_held = max(peak_held, held)
        rows.append({"stage": stage, "order": " ".join(f"{e['kind'][0].upper()}{e['micro_batch']}" for e in events),
                     "busy_seconds": busy, "idle_fraction": 1 - busy / step_seconds, "peak_held": peak_held})
    return {"step_start": step_start, "step_seconds": step_seconds, "stages": rows}


def plot(runs, pp_size, micro_batches, ideal, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    colors = {"forward": "#4c72b0", "backward": "#dd8452"}
    # Each schedule on its own time axis: on a busy machine their step times differ by more than the schedule.
    fig, axes = plt.subplots(len(runs), 1, figsize=(12, 1.2 + 0.75 * pp_size * len(runs)), squeeze=False)
    for ax, (engine, (stages, summary)) in zip(axes[:, 0], runs.items()):
        for stage, events in enumerate(stages):
            for event in events:
                left = (event["start"] - summary["step_start"]) * 1e3
                width = (event["end"] - event["start"]) * 1e3
                ax.barh(stage, width, left=left, height=0.8, color=colors[event["kind"]], edgecolor="white")
                ax.text(left + width / 2, stage, f"{event['kind'][0].upper()}{event['micro_batch']}", ha="center",
                        va="center", fontsize=7, color="white")
        idle = ", ".join(f"{row['idle_fraction']:.0%}" for row in summary["stages"])
        ax.set_title(f"{engine.upper()}: {summary['step_seconds'] * 1e3:.0f} ms per step | idle per stage "
                     f"{idle} | ideal bubble (p-1)/(m+p-1) = {ideal:.0%}", fontsize=10)
        ax.set_yticks(range(pp_size), [f"stage {stage}" for stage in range(pp_size)])
        ax.invert_yaxis()  # stage 0 on top, as the schedules are usually drawn
        ax.grid(axis="x", alpha=0.3)
        ax.set_xlabel("ms since the step's first forward (white: the stage is idle)", fontsize=8)
    handles = [Patch(color=color, label=kind) for kind, color in colors.items()]
    fig.legend(handles=handles, loc="upper right", fontsize=8)
    fig.suptitle(f"Pipeline timeline, pp {pp_size}, {micro_batches} micro-batches (measured)", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main():
    args = parse_args()
    p, m = args.pp_size, args.gradient_accumulation_steps
    ideal = (p - 1) / (m + p - 1)
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for engine in args.engines:
            timeline_dir = Path(tmp) / engine
            timeline_dir.mkdir()
            stages = last_step(record(args, engine, timeline_dir), p, m)
            runs[engine] = (stages, summarize(stages))

    print(f"pp {p}, {m} micro-batches of {args.micro_batch_size} x {args.seq_len} tokens, {args.num_hidden_layers} "
          f"layers, {args.device} | the last of {args.steps} steps | ideal bubble (p-1)/(m+p-1) = {ideal:.1%}")
    for engine, (_, summary) in runs.items():
        print(f"\n{engine}: {summary['step_seconds'] * 1e3:.0f} ms per step")
        for row in summary["stages"]:
            print(f"  stage {row['stage']}: idle {row['idle_fraction']:6.1%} (ideal {ideal:.1%}) | held at most "
                  f"{row['peak_held']} micro-batches | {row['order']}")
    plot(runs, p, m, ideal, args.output)
    print(f"\nplot: {args.output}")
    if args.json:
        args.json.write_text(json.dumps({"ideal_bubble": ideal, **{e: s for e, (_, s) in runs.items()}}, indent=2))


if __name__ == "__main__":
    main()
