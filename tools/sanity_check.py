"""The tutorial's sanity check, made numeric: train the same run in six layouts and compare losses.

Runs, each through torchrun with a --metrics_file, the layouts of the original tutorial's sanity
check with the same global batch (micro_batch_size x gradient_accumulation_steps x dp_size):

    baseline  step3, 1 process
    tp4       step4, --tp_size 4
    dp4       step6, --dp_size 4 (bucketed data parallel), micro batch / 4
    pp4_1f1b  step8, --pp_size 4 --pp_engine 1f1b
    3d        step8, --tp_size 2 --pp_size 2 --dp_size 2 --pp_engine 1f1b, micro batch / 2
    cp4       step9, --cp_size 4 (context parallel: every sequence split over 4 ranks)

then prints a table (final loss, max |dloss| and the largest relative difference of the global gradient norm
against the baseline over all steps) and draws the loss curves plus |dloss| on a log scale.

    python tools/sanity_check.py                        # embedded defaults on the CPU, ~4 min on 2 cores
    python tools/sanity_check.py --model_name TinyLlama/TinyLlama_v1.1 --dataset_name roneneldan/TinyStories \\
        --num_hidden_layers 22 --num_attention_heads 32 --num_key_value_heads 4 --seq_len 1024 \\
        --micro_batch_size 4 --gradient_accumulation_steps 8 --max_tokens 4096000 --num_proc 16 \\
        --plot assets/llama1B_sanity_check.png     # the original 1B check, on 8 GPUs
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# name: (step folder, processes, layout flags, divisor of the baseline micro batch size)
LAYOUTS = {
    "baseline": ("step3_dataloader", 1, [], 1),
    "tp4": ("step4_tensor_parallel", 4, ["--tp_size", "4"], 1),
    "dp4": ("step6_data_parallel_bucket", 4, ["--dp_size", "4"], 4),
    "pp4_1f1b": ("step8_pipeline_parallel_1f1b", 4, ["--pp_size", "4", "--pp_engine", "1f1b"], 1),
    "3d": ("step8_pipeline_parallel_1f1b", 8, ["--tp_size", "2", "--pp_size", "2", "--dp_size", "2",
                                                "--pp_engine", "1f1b"], 2),
    "cp4": ("step9_context_parallel", 4, ["--cp_size", "4"], 1),
}
PASSED_THROUGH = ("model_name", "dataset_name", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                  "seq_len", "gradient_accumulation_steps", "max_tokens", "learning_rate", "seed", "num_proc",
                  "device", "dtype")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name", default=None, help="default: each step's default (the embedded tiny Llama)")
    parser.add_argument("--dataset_name", default=None, help="default: the embedded tiny corpus")
    parser.add_argument("--num_hidden_layers", type=int, default=None)
    parser.add_argument("--num_attention_heads", type=int, default=None)
    parser.add_argument("--num_key_value_heads", type=int, default=None)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--micro_batch_size", type=int, default=4, help="of the baseline; dp layouts divide it")
    parser.add_argument("--gradient_accumulation_steps", type=int, default=8)
    parser.add_argument("--max_tokens", type=int, default=30 * 4 * 8 * 64, help="default: 30 steps")
    parser.add_argument("--learning_rate", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--num_proc", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--layouts", nargs="+", choices=list(LAYOUTS), default=list(LAYOUTS))
    parser.add_argument("--out_dir", type=Path, default=ROOT / "runs" / "sanity_check", help="metrics files and logs")
    parser.add_argument("--plot", type=Path, default=ROOT / "assets" / "sanity_check_cpu.png")
    parser.add_argument("--table", type=Path, default=ROOT / "assets" / "sanity_check_cpu.md")
    parser.add_argument("--replot", action="store_true", help="redraw from the metrics files in --out_dir, no runs")
    return parser.parse_args(argv)


def layout_command(args, name):
    folder, nproc, layout_flags, divisor = LAYOUTS[name]
    if args.micro_batch_size % divisor:
        sys.exit(f"error: --micro_batch_size {args.micro_batch_size} must be divisible by {divisor} for layout {name}")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               str(ROOT / folder / "train.py"), *layout_flags,
               "--micro_batch_size", str(args.micro_batch_size // divisor),
               "--metrics_file", str(args.out_dir / f"{name}.jsonl"), "--run_name", f"sanity_{name}"]
    for flag in PASSED_THROUGH:
        if getattr(args, flag) is not None:
            command += [f"--{flag}", str(getattr(args, flag))]
    return command


def read_metrics(args, name, key):
    return [json.loads(line)[key] for line in (args.out_dir / f"{name}.jsonl").read_text().splitlines()]


def run_layouts(args):
    args.out_dir.mkdir(parents=True, exist_ok=True)
    losses = {}
    for i, name in enumerate(args.layouts, 1):
        command = layout_command(args, name)
        start = time.time()
        with open(args.out_dir / f"{name}.log", "w") as log:
            result = subprocess.run(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        if result.returncode != 0:
            sys.exit(f"error: layout {name} failed (exit {result.returncode}); see {args.out_dir / f'{name}.log'}")
        metrics = [json.loads(line) for line in (args.out_dir / f"{name}.jsonl").read_text().splitlines()]
        losses[name] = [m["loss"] for m in metrics]
        print(f"[{i}/{len(args.layouts)}] {name:<9} {LAYOUTS[name][1]} processes, {len(metrics)} steps, "
              f"final loss {losses[name][-1]:.4f}, {time.time() - start:.0f}s", flush=True)
    return losses


def summarize(losses, grad_norms):
    """Rows of (layout, steps, final loss, max |dloss| vs baseline, |dloss| at step 1, max relative difference of
    the global gradient norm vs baseline)."""
    base, base_norms = losses["baseline"], grad_norms["baseline"]
    rows = []
    for name, curve in losses.items():
        if len(curve) != len(base):
            sys.exit(f"error: layout {name} ran {len(curve)} steps, the baseline {len(base)}")
        deltas = [abs(a - b) for a, b in zip(curve, base)]
        norm_deltas = [abs(a - b) / b for a, b in zip(grad_norms[name], base_norms)]
        rows.append({"layout": name, "steps": len(curve), "final_loss": curve[-1], "max_abs_dloss": max(deltas),
                     "step1_abs_dloss": deltas[0], "max_rel_dgrad_norm": max(norm_deltas)})
    return rows


def format_table(rows):
    lines = ["| layout | steps | final loss | max abs dloss vs baseline | abs dloss at step 1 "
             "| max rel. d(grad norm) vs baseline |", "| --- | --- | --- | --- | --- | --- |"]
    for row in rows:
        lines.append(f"| {row['layout']} | {row['steps']} | {row['final_loss']:.4f} | {row['max_abs_dloss']:.2e} "
                     f"| {row['step1_abs_dloss']:.2e} | {row['max_rel_dgrad_norm']:.2e} |")
    return "\n".join(lines)


def plot(losses, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = losses["baseline"]
    fig, (ax_loss, ax_delta) = plt.subplots(1, 2, figsize=(12, 4.5))
    for color, (name, curve) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"], losses.items()):
        steps = range(1, len(curve) + 1)
        ax_loss.plot(steps, curve, label=name, color=color, linewidth=1.5, alpha=0.8)
        if name != "baseline":
            # exact zeros (a layout bit-identical to the baseline) cannot sit on a log axis: draw them at 1e-9
            deltas = [max(abs(a - b), 1e-9) for a, b in zip(curve, base)]
            ax_delta.plot(steps, deltas, label=name, color=color, marker=".", linewidth=1)
    ax_loss.set(xlabel="optimizer step", ylabel="loss", title="Loss per layout (the curves overlap)")
    ax_delta.set(xlabel="optimizer step", ylabel="|loss - baseline loss|  (exact 0 drawn at 1e-9)", yscale="log",
                 ylim=(5e-10, 1e-2), title="Difference from the single-process baseline")
    ax_delta.axhline(1e-4, color="gray", linestyle="--", linewidth=1, label="1e-4 (parity bound)")
    ax_loss.legend()
    ax_delta.legend(loc="upper left", ncol=3, fontsize="small")
    for ax in (ax_loss, ax_delta):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None):
    args = parse_args(argv)
    if "baseline" not in args.layouts:
        args.layouts.insert(0, "baseline")
    losses = ({name: read_metrics(args, name, "loss") for name in args.layouts} if args.replot
              else run_layouts(args))
    rows = summarize(losses, {name: read_metrics(args, name, "grad_norm") for name in args.layouts})
    table = format_table(rows)
    print(table)
    (args.out_dir / "summary.json").write_text(json.dumps(rows, indent=2))
    if args.table:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(table + "\n")
    if args.plot:
        plot(losses, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
