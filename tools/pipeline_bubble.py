"""The pipeline bubble of step 14's schedules, measured beside its theory: 1F1B, interleaved 1F1B and zero bubble
(ZB-H1), at pp 4 and 8 micro-batches by default.

Runs step 14's train.py under torchrun once per schedule and mode with PIPELINE_TIMELINE set, so every stage appends
the start and end of each forward (F), backward (B: with zb_h1 the input gradient only) and weight pass (W, zb_h1)
to a file of its own. From the last optimizer step of each run:

    makespan         the step's last pass end minus its first pass start, over all stages
    ideal            the summed pass durations of the busiest stage (its own work, were it never idle)
    bubble_measured  (makespan - ideal) / ideal
    bubble_theory    pipeline_schedules.bubble_theory: (p - 1) / m for 1F1B, (p - 1) / (v m) interleaved with v chunks
                     per stage, (p - 1) / (3 m) for ZB-H1 (equal F, B, W)

Two modes:

    fixed  PIPELINE_PASS_SECONDS pads every pass to units x T seconds (a tiny model whose real compute stays well
           below T): the schedule's shape, apart from this machine. Interleaved runs get T / v, since each chunk
           pass is 1/v of the stage's layers. The goals are judged on this mode. What is left between the theory
           and the measurement is what runs outside the passes (the exchanges, the schedule's own Python): about
           1 ms between back-to-back passes with a core per stage, 1.5-2 ms with 4 stages on 2 cores, which
           adds to the makespan, not to the ideal. It does not shrink with T, so T = 0.2 s (100 times it) is the
           default: at T = 0.1 s ZB-H1, whose makespan has the most passes, came out 13-18% over its theory.
    real   no padding, a model large enough that compute dominates: the bubble this machine gets. With more stages
           than cores (4 processes on a 2-core laptop) the operating system time-slices them, so passes stretch
           when their neighbours compute and idle time is partly hidden: read these numbers as the machine's.

    python tools/pipeline_bubble.py                          # table; both modes, three schedules
    python tools/pipeline_bubble.py --json > bubbles.jsonl   # one JSON object per schedule and mode
    python tools/pipeline_bubble.py --modes fixed --plot      # -> assets/pipeline_schedules.png
    python tools/pipeline_bubble.py --pp_size 2 --micro_batches 4 --engines zb_h1 1f1b --virtual_pp_size 2 4
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from lib.measure import cpu_name, free_port
from lib.steps import ROOT, use_step

STEP = use_step("step14_pipeline_parallel_interleaved")
from pipeline_schedules import SCHEDULES, bubble_theory  # noqa: E402  (step 14's module, found by use_step)

KIND_LETTER = {"forward": "F", "backward": "B", "weight": "W"}
GOALS = {"1f1b": None, "interleaved_1f1b": 0.6, "zb_h1": 0.45}  # at most this many times 1F1B's measured bubble
TOLERANCE = 0.2  # each schedule's measured bubble within 20% of its theory
FIXED_SHAPE = ("1", "32")  # micro_batch_size, seq_len of the fixed mode: real compute of a few ms per pass


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pp_size", type=int, default=4)
    parser.add_argument("--micro_batches", type=int, default=8, help="gradient accumulation steps")
    parser.add_argument("--engines", nargs="+", choices=list(SCHEDULES), default=list(SCHEDULES))
    parser.add_argument("--virtual_pp_size", type=int, nargs="+", default=[2], help="interleaved: one run per value")
    parser.add_argument("--modes", nargs="+", choices=["fixed", "real"], default=["fixed", "real"])
    parser.add_argument("--pass_seconds", type=float, default=0.2, help="fixed mode: T, the length of one unit")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per run; the last one is measured")
    parser.add_argument("--num_hidden_layers", type=int, default=8)
    parser.add_argument("--micro_batch_size", type=int, default=2, help="real mode")
    parser.add_argument("--seq_len", type=int, default=128, help="real mode")
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of the table")
    parser.add_argument("--plot", type=Path, nargs="?", const=ROOT / "assets" / "pipeline_schedules.png",
                        default=None, help="draw the fixed-mode runs (default path: assets/pipeline_schedules.png)")
    return parser.parse_args(argv)


def configurations(args):
    """(engine, virtual_pp_size) pairs to run: one per chunk count for interleaved, v = 1 for the others."""
    return [(engine, v) for engine in args.engines
            for v in (args.virtual_pp_size if engine == "interleaved_1f1b" else [1])]


def record(args, engine, v, mode, timeline_dir):
    """Run step 14 once with the timeline on; returns each global rank's events in the order it wrote them."""
    batch, seq = FIXED_SHAPE if mode == "fixed" else (str(args.micro_batch_size), str(args.seq_len))
    tokens = args.steps * args.micro_batches * int(batch) * int(seq)
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", f"--nproc_per_node={args.pp_size}",
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(STEP / "train.py"),
               "--pp_size", str(args.pp_size), "--pp_engine", engine, "--virtual_pp_size", str(v),
               "--gradient_accumulation_steps", str(args.micro_batches), "--micro_batch_size", batch,
               "--seq_len", seq, "--num_hidden_layers", str(args.num_hidden_layers), "--max_tokens", str(tokens),
               "--device", "cpu"]
    env = {"OMP_NUM_THREADS": "1", **os.environ, "PIPELINE_TIMELINE": str(timeline_dir)}
    env.pop("VERBOSE", None)  # printing every exchange would be timed too
    env.pop("PIPELINE_PASS_SECONDS", None)
    if mode == "fixed":
        env["PIPELINE_PASS_SECONDS"] = repr(args.pass_seconds / v)  # a chunk's pass is 1/v of the stage's work
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"error: the {engine} (v {v}, {mode}) run failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return [[json.loads(line) for line in (timeline_dir / f"rank_{rank}.jsonl").read_text().splitlines()]
            for rank in range(args.pp_size)]


def last_step(ranks, engine, pp_size, micro_batches, v):
    """Each stage's passes of the last optimizer step, labelled from the schedule's table: a stage runs its passes
    in the table's order, so its k-th forward of the step is the table's k-th F (and so for B and W)."""
    stages = []
    for rank, events in enumerate(ranks):
        table = SCHEDULES[engine](pp_size, rank, micro_batches, v)
        step = events[-len(table):]  # every optimizer step writes the same number of lines
        by_kind = {letter: [p for p in table if p.kind == letter] for letter in "FBW"}
        seen = {letter: 0 for letter in "FBW"}
        labelled = []
        for event in step:
            letter = KIND_LETTER[event["kind"]]
            scheduled = by_kind[letter][seen[letter]]
            seen[letter] += 1
            labelled.append({**event, "pass": letter, "chunk": scheduled.chunk, "micro_batch": scheduled.micro_batch})
        if [e["pass"] for e in labelled] != [p.kind for p in table]:
            sys.exit(f"error: stage {rank}'s passes do not follow the {engine} table")
        stages.append(labelled)
    return stages


def bubble(stages):
    """(makespan - ideal) / ideal for the busiest stage, with the step's start and the ideal in seconds."""
    start = min(e["start"] for events in stages for e in events)
    makespan = max(e["end"] for events in stages for e in events) - start
    ideal = max(sum(e["end"] - e["start"] for e in events) for events in stages)
    return (makespan - ideal) / ideal, start, ideal


def overruns(stages, pass_seconds):
    """Fixed mode: the passes that lasted over 5% more than their padding (compute longer than T, or the process
    descheduled when its sleep ended). The padding of a kind is its shortest pass, T x units at the least."""
    shortest = {letter: min(e["end"] - e["start"] for events in stages for e in events if e["pass"] == letter)
                for letter in {e["pass"] for events in stages for e in events}}
    return sum(e["end"] - e["start"] > 1.05 * max(pass_seconds, shortest[e["pass"]])
               for events in stages for e in events)


def measure(args):
    """Every configuration in every mode: one row each, and the fixed-mode passes for the picture."""
    rows, drawn = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes:
            for engine, v in configurations(args):
                timeline_dir = Path(tmp) / f"{mode}_{engine}_{v}"
                timeline_dir.mkdir()
                stages = last_step(record(args, engine, v, mode, timeline_dir), engine, args.pp_size,
                                   args.micro_batches, v)
                measured, start, ideal = bubble(stages)
                row = {"engine": engine, "pp_size": args.pp_size, "virtual_pp_size": v,
                       "micro_batches": args.micro_batches, "bubble_measured": measured,
                       "bubble_theory": bubble_theory(engine, args.pp_size, args.micro_batches, v), "mode": mode,
                       "makespan_seconds": ideal * (1 + measured)}
                if mode == "fixed":
                    row["passes_over_padding"] = overruns(stages, args.pass_seconds / v)
                    drawn[(engine, v)] = (stages, start, row)
                rows.append(row)
    return judge(rows), drawn


def judge(rows):
    """Add to each row its ratio to the same mode's measured 1F1B bubble and the goals beside it."""
    for row in rows:
        ones = [r for r in rows if r["engine"] == "1f1b" and r["mode"] == row["mode"]]
        base = ones[0]["bubble_measured"] if ones else None
        row["ratio_to_1f1b"] = row["bubble_measured"] / base if base else None
        row["within_20pct"] = abs(row["bubble_measured"] - row["bubble_theory"]) <= TOLERANCE * row["bubble_theory"]
        limit = GOALS[row["engine"]]
        row["goal"] = f"within {TOLERANCE:.0%} of theory" + (f"; <= {limit}x 1F1B's bubble" if limit else "")
        row["goal_met"] = row["within_20pct"] and (limit is None or (row["ratio_to_1f1b"] is not None
                                                                     and row["ratio_to_1f1b"] <= limit))
    return rows


def print_table(args, rows):
    print(f"CPU: {cpu_name()} | pp {args.pp_size}, {args.micro_batches} micro-batches, {args.num_hidden_layers} "
          f"layers | the last of {args.steps} steps | fixed: T = {args.pass_seconds} s per unit (T/v interleaved), "
          f"mb 1 x seq 32; real: mb {args.micro_batch_size} x seq {args.seq_len} | goals judged on fixed")
    print(f"{'mode':5} {'engine':16} {'v':>2} {'step s':>7} {'measured':>9} {'theory':>7} {'vs 1F1B':>8} "
          f"{'in 20%':>6} {'met':>4}  goal")
    for row in rows:
        ratio = "-" if row["ratio_to_1f1b"] is None else f"{row['ratio_to_1f1b']:.2f}x"
        print(f"{row['mode']:5} {row['engine']:16} {row['virtual_pp_size']:>2} {row['makespan_seconds']:7.2f} "
              f"{row['bubble_measured']:9.3f} {row['bubble_theory']:7.3f} {ratio:>8} "
              f"{'yes' if row['within_20pct'] else 'no':>6} {'yes' if row['goal_met'] else 'no':>4}  {row['goal']}")
    late = [f"{r['engine']} v{r['virtual_pp_size']}: {r['passes_over_padding']}" for r in rows
            if r.get("passes_over_padding")]
    if late:
        print("fixed-mode passes longer than their padding (compute over T, or descheduled): " + ", ".join(late))


def plot(drawn, args, path):
    """The fixed-mode runs one above another: a row per stage, a box per pass, time in units of T."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    colors = {"F": ("#4c72b0", "#8fb0e0"), "B": ("#dd8452", "#f2b98f"), "W": ("#55a868", "#9dd4a9")}  # chunk 0, 1+
    fig, axes = plt.subplots(len(drawn), 1, figsize=(12, 0.6 + 0.5 * args.pp_size * len(drawn)), sharex=True,
                             squeeze=False)
    for ax, ((engine, v), (stages, start, row)) in zip(axes[:, 0], drawn.items()):
        for stage, events in enumerate(stages):
            for e in events:
                left, width = (e["start"] - start) / args.pass_seconds, (e["end"] - e["start"]) / args.pass_seconds
                ax.barh(stage, width, left=left, height=0.8, color=colors[e["pass"]][min(e["chunk"], 1)],
                        edgecolor="white", linewidth=0.5)
                ax.text(left + width / 2, stage, str(e["micro_batch"]), ha="center", va="center", fontsize=6)
        name = engine + (f" (v = {v}: light boxes are chunk 1)" if v > 1 else "")
        ax.set_title(f"{name}: bubble measured {row['bubble_measured']:.3f}, theory {row['bubble_theory']:.3f}",
                     fontsize=9)
        ax.set_yticks(range(args.pp_size), [f"stage {s}" for s in range(args.pp_size)], fontsize=7)
        ax.invert_yaxis()  # stage 0 on top
        ax.grid(axis="x", alpha=0.3)
    axes[-1, 0].set_xlabel("time in units of T (a forward of a whole stage); numbers: micro-batch; white: idle",
                           fontsize=8)
    handles = [Patch(color=colors[k][0], label=label) for k, label in
               (("F", "forward"), ("B", "backward (zb_h1: input grad)"), ("W", "weight grad (zb_h1)"))]
    fig.legend(handles=handles, loc="upper right", fontsize=7, ncol=3)
    fig.suptitle(f"Pipeline schedules, pp {args.pp_size}, {args.micro_batches} micro-batches, every pass padded to "
                 f"its units x T (measured)", fontsize=10, x=0.35)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)


def main(argv=None):
    args = parse_args(argv)
    if args.plot and "fixed" not in args.modes:
        sys.exit("error: --plot draws the fixed-mode runs: add fixed to --modes")
    rows, drawn = measure(args)
    if args.json:
        cpu = cpu_name()
        for row in rows:
            print(json.dumps({**row, "cpu": cpu}))
    else:
        print_table(args, rows)
    if args.plot:
        plot(drawn, args, args.plot)
        print(f"plot: {args.plot}", file=sys.stderr if args.json else sys.stdout)


if __name__ == "__main__":
    main()
