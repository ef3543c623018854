"""Activation memory of step 13 per rank and micro-batch: tensor parallelism 1, 2 and 4, with and without
--sequence_parallel, under --recompute none, selective and full, measured beside the step's own accounting
(formula_bytes below), on CPU with gloo, one thread per rank.

For each tp size the tool starts tp processes (a gloo group on 127.0.0.1). Each rank builds Llama(config) from the
seed, cuts its shards with apply_tensor_parallel(model, sequence_parallel) (tp > 1; both with and without sequence
parallelism, two models side by side) and, for each recompute mode (set_recompute), measures:

    activation_bytes  the bytes of the unique storages autograd saves for backward during one forward of the model
                      (torch.autograd.graph.saved_tensors_hooks, lib.measure.ActivationMeter: several saved views
                      of one storage count once, parameters not at all), read at the end of the forward, the most
                      any rank of the group holds. The loss is computed outside the hooks: the logits and the
                      cross-entropy's log-softmax are not counted (see formula_bytes)
    formula_bytes     the same quantity from the step's accounting, term by term (formula_bytes)
    step_s            the median over --steps of one forward + loss + backward (no optimizer), the slowest rank's
                      time; the modes and layouts of one tp size take turns, step by step, so that a busy machine
                      slows them alike
    cpu_s             the same steps' CPU time (time.process_time, the rank that used most): what the recomputation
                      costs when other processes share the cores and the wall times scatter

Printed beside each row: measured / formula (goal: within 10%), the bytes and the step time as a ratio to the
recompute-none row of the same layout (goals: full <= 0.25x the bytes at <= 1.5x the time; selective between full
and none at <= 1.2x the time), and tp 4 + sequence parallelism against tp 1 in the same mode (goal <= 0.30x).

The default shape is the embedded tiny Llama at seq 512, micro-batch 2, in fp32: activations (92 MB at tp 1) are
twice its weights and gradients (42 MB), and the whole run takes about a minute on 2 free cores. bf16 (--dtype
bfloat16) shows selective recomputation's benefit better (RMSNorm keeps an fp32 copy of its input there), but a CPU
without bf16 matrix instructions (AVX512-BF16, AMX) takes about 15x longer a step (9 s against 0.6 s at tp 1 on an
AMD EPYC without them), so bf16 is for --steps 0 (bytes only) or such a CPU.

    python tools/benchmark_activations.py                                   # the table
    python tools/benchmark_activations.py --plot assets/activation_memory.png
    python tools/benchmark_activations.py --json                            # one JSON object per row
    python tools/benchmark_activations.py --dtype bfloat16 --steps 0        # bf16 bytes, no timing
"""
import argparse
import json
import statistics
import tempfile
import time
import types
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from lib.measure import ActivationMeter, cpu_name, free_port
from lib.steps import ROOT, use_step

use_step("step13_sequence_parallel")
import process_group_manager as pgm  # noqa: E402
from model import RECOMPUTE, Llama, set_recompute  # noqa: E402
from tensor_parallel import apply_tensor_parallel  # noqa: E402

FORMULA_TOLERANCE = 0.10  # every row within 10% of its formula
FULL_BYTES, FULL_TIME, SELECTIVE_TIME, TP4_SP_BYTES = 0.25, 1.5, 1.2, 0.30  # the goals, as ratios
INDEX_BYTES, MASK_BYTES, STAT_BYTES = 8, 1, 4  # int64 token ids, bool masks, fp32 statistics


def norm_bytes(tokens, hidden, dtype_bytes, recomputed):
    """What one RMSNorm over `tokens` tokens keeps (see formula_bytes)."""
    if recomputed:
        return 3 * tokens * hidden * dtype_bytes  # the input, the normalised (the weight's), the output
    return tokens * (hidden * STAT_BYTES + STAT_BYTES + 2 * hidden * dtype_bytes)


def formula_bytes(*, batch, seq, hidden, intermediate, heads, kv_heads, head_dim, layers, dtype_bytes, tp,
                  sequence_parallel, recompute):
    """Bytes one rank keeps for backward during the forward of one micro-batch of step 13's Llama: each storage
    once, parameters excluded, logits excluded. T = batch * seq tokens; e = dtype_bytes; n = the tokens a rank holds
    outside the tensor-parallel matmuls: T, or T / tp under sequence parallelism; h = hidden, i = intermediate,
    H and K = query and key/value heads, d = head_dim, tp = the tensor-parallel size.

    Per decoder layer, recompute none:
      two RMSNorms over n tokens, each n * (4h + 4 + 2he):
        4nh   the fp32 tensor the statistics are computed from, saved by pow and by the multiply: in fp32 the
              input itself; in bf16 x.float() is a copy (twice the input's bytes), and the bf16 input is kept by
              nobody (a cast's backward needs no input; the residual adds keep nothing)
        4n    rsqrt(mean(x^2) + eps), fp32, saved by the multiply
        nhe   the normalised .to(dtype), saved by the weight multiply for the weight's gradient (in fp32 .to is no
              copy and this is the product itself)
        nhe   the norm's output, saved by the projections that read it: q/k/v or gate/up (F.linear; under tensor
              parallelism the copy into the region is a view; under sequence parallelism GatheredLinear keeps this
              part only, never the gathered sequence); in the model's norm, the LM head's input
      attention over all T tokens (the column-parallel projections gather the sequence) with H/tp query heads and
      K/tp key/value heads on this rank, T * ((2H + 2K) * d * e + 4H) / tp:
        T*H*d*e/tp   q after the rotary embedding, saved by scaled_dot_product_attention
        T*K*d*e/tp   k after the rotary embedding, saved by it too (grouped-query attention: no repeated copies)
        T*K*d*e/tp   v, saved by it too
        T*H*d*e/tp   its output, saved by it and by o_proj (the transpose and reshape between are views)
        4*T*H/tp     its fp32 logsumexp (CPU flash kernel)
        (the rotary multiplies by cos and sin save cos and sin only, not q and k before the rotation)
      MLP over T tokens with i/tp intermediate features on this rank, 4 * T * i * e / tp: gate (saved by silu),
        silu(gate) and up (saved by the product), silu(gate) * up (saved by down_proj)
      o_proj and down_proj give partial sums, all-reduced or reduce-scattered; the residual adds: nothing kept
    recompute selective, the element-wise work between the matmuls recomputed (torch.utils.checkpoint keeps the
    inputs of what it recomputes, and the matmuls keep their inputs and outputs):
      each RMSNorm 3 * n * h * e: its input, the normalised (the weight multiply's) and the output; no fp32 copy,
        no statistics
      attention as none: nothing in it is recomputed (the rotary embedding keeps only cos and sin; recomputing it
        would keep q and k before the rotation, its inputs, which none does not keep)
      MLP 3 * T * i * e / tp: gate and up (the recomputed SwiGLU's inputs), the product (down_proj's input)
    recompute full: the layer's input only, n * h * e (and cos, sin: shared, below)

    Outside the layers:
      token ids T * 8 (int64) saved by the embedding lookup; at tp > 1 the vocabulary-parallel embedding's local ids
        T * 8 and its bool mask of the ids other ranks own T * 1: whole on every rank, as the ids are
      cos and sin 2 * T * d * e: computed for the whole sequence on every rank, one pair shared by every layer (kept
        by the rotary multiply, or as the recomputed layer's inputs)
      the model's RMSNorm over n tokens as in a layer (recomputed under selective only: under full it is outside
        every layer); its output is the LM head's input
      not counted: the logits. The model's forward keeps nothing of its output (the LM head's all-gather keeps
        nothing); the loss's log-softmax (T * vocab * 4 in fp32, whole on every rank at any tp, since the LM head
        gathers the vocabulary) is computed outside the measured forward

    Total: layers * (per layer) + ids + cos/sin + the model's norm."""
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute {recompute!r} is not one of {RECOMPUTE}")
    e, tokens = dtype_bytes, batch * seq
    local = tokens // tp if sequence_parallel else tokens  # n
    selective = recompute == "selective"
    local_heads, local_kv_heads, local_intermediate = heads // tp, kv_heads // tp, intermediate // tp
    if recompute == "full":
        layer = local * hidden * e
    else:
        norms = 2 * norm_bytes(local, hidden, e, recomputed=selective)
        # q: after the rotary and the attention's output; k: after the rotary and v
        attention = tokens * (2 * (local_heads + local_kv_heads) * head_dim * e + STAT_BYTES * local_heads)
        mlp = (3 if selective else 4) * tokens * local_intermediate * e
        layer = norms + attention + mlp
    ids = tokens * (INDEX_BYTES + (MASK_BYTES if tp > 1 else 0))
    rotary = 2 * tokens * head_dim * e
    final_norm = norm_bytes(local, hidden, e, recomputed=selective)
    return layers * layer + ids + rotary + final_norm


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name", default=str(ROOT / "assets" / "tiny_llama"), help="folder of config.json")
    parser.add_argument("--num_hidden_layers", type=int, default=None, help="override the config's")
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--micro_batch_size", type=int, default=2)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--tp_sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--recompute", nargs="+", choices=RECOMPUTE, default=list(RECOMPUTE))
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row after the measured one (0: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="one JSON object per row instead of the table")
    parser.add_argument("--plot", default=None, help="draw the rows into this PNG")
    return parser.parse_args(argv)


def load_config(args):
    """The config.json of --model_name as attributes (what model.py reads), without importing transformers: the
    ranks start faster."""
    config = types.SimpleNamespace(**json.loads((Path(args.model_name) / "config.json").read_text()))
    if args.num_hidden_layers is not None:
        config.num_hidden_layers = args.num_hidden_layers
    return config


def build(config, tp, sequence_parallel, dtype, seed):
    """This rank's model: the full Llama from the seed, cut to this rank's shards (tp > 1), in dtype."""
    torch.manual_seed(seed)
    model = Llama(config)
    if tp > 1:
        apply_tensor_parallel(model, sequence_parallel)
    return model.to(dtype=dtype)


def train_step(model, batch):
    """Forward, loss (outside any saved-tensor hooks the caller set around the forward), backward."""
    model.zero_grad(set_to_none=True)
    logits = model(batch["input_ids"])
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch["target_ids"].reshape(-1)).backward()


def measured_bytes(model, batch):
    """The bytes of the unique storages saved for backward by one forward; the backward runs after (it also warms
    up the row's timed steps)."""
    meter = ActivationMeter(model.parameters())
    model.zero_grad(set_to_none=True)
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
        logits = model(batch["input_ids"])
    saved = meter.live
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch["target_ids"].reshape(-1)).backward()
    return saved


def worker(rank, tp, port, args, result_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=tp)
    pgm.setup_process_group_manager(tp_size=tp, cp_size=1, pp_size=1, dp_size=1)
    config, dtype = load_config(args), getattr(torch, args.dtype)
    tokens = torch.randint(0, config.vocab_size, (args.micro_batch_size, args.seq_len + 1),
                           generator=torch.Generator().manual_seed(args.seed))  # the same on every tp rank
    batch = {"input_ids": tokens[:, :-1].contiguous(), "target_ids": tokens[:, 1:]}  # ids: their own storage
    models = {sp: build(config, tp, sp, dtype, args.seed) for sp in ((False, True) if tp > 1 else (False,))}
    rows = [(sp, mode) for sp in models for mode in args.recompute]
    saved = []
    for sp, mode in rows:
        set_recompute(models[sp], mode)
        saved.append(measured_bytes(models[sp], batch))
    durations = torch.zeros(2, len(rows), args.steps, dtype=torch.float64)  # wall, CPU
    for step in range(args.steps):  # the rows take turns, step by step
        for index, (sp, mode) in enumerate(rows):
            set_recompute(models[sp], mode)
            dist.barrier()
            start, cpu_start = time.perf_counter(), time.process_time()
            train_step(models[sp], batch)
            durations[:, index, step] = torch.tensor([time.perf_counter() - start, time.process_time() - cpu_start])
    most, least = torch.tensor(saved, dtype=torch.float64), torch.tensor(saved, dtype=torch.float64)
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    dist.all_reduce(least, op=dist.ReduceOp.MIN)
    dist.all_reduce(durations, op=dist.ReduceOp.MAX)  # a step lasts as long as its slowest rank
    if rank == 0:
        results = [row(config, args, tp, sp, mode, int(most[i]), int(least[i]), durations[:, i].tolist())
                   for i, (sp, mode) in enumerate(rows)]
        (Path(result_dir) / f"tp{tp}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def row(config, args, tp, sp, mode, most, least, durations):
    wall, cpu = durations
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    formula = formula_bytes(batch=args.micro_batch_size, seq=args.seq_len, hidden=config.hidden_size,
                            intermediate=config.intermediate_size, heads=config.num_attention_heads,
                            kv_heads=config.num_key_value_heads, head_dim=head_dim, layers=config.num_hidden_layers,
                            dtype_bytes=getattr(torch, args.dtype).itemsize, tp=tp, sequence_parallel=sp,
                            recompute=mode)
    return {"tp_size": tp, "sequence_parallel": sp, "recompute": mode, "activation_bytes": most,
            "formula_bytes": formula, "step_s": statistics.median(wall) if wall else None,
            "cpu_s": statistics.median(cpu) if cpu else None, "step_times_s": wall, "cpu_times_s": cpu,
            "ranks_differ_bytes": most - least, "dtype": args.dtype,
            "seq_len": args.seq_len, "micro_batch_size": args.micro_batch_size,
            "num_hidden_layers": config.num_hidden_layers}


def run(args):
    """Every row, tp size after tp size (each its own process group, ranks forked from this process)."""
    rows = []
    with tempfile.TemporaryDirectory() as result_dir:
        for tp in args.tp_sizes:
            mp.start_processes(worker, args=(tp, free_port(), args, result_dir), nprocs=tp, join=True,
                               start_method="fork")
            rows += json.loads((Path(result_dir) / f"tp{tp}.json").read_text())
    add_ratios(rows)
    return rows


def add_ratios(rows):
    """Each row's bytes and time over its layout's recompute-none row, and tp > 1's bytes over tp 1's in the same
    mode (None where the other row is missing)."""
    def find(tp, sp, mode):
        return next((r for r in rows if (r["tp_size"], r["sequence_parallel"], r["recompute"]) == (tp, sp, mode)),
                    None)

    for r in rows:
        none, tp1 = find(r["tp_size"], r["sequence_parallel"], "none"), find(1, False, r["recompute"])
        r["formula_ratio"] = r["activation_bytes"] / r["formula_bytes"]
        r["bytes_vs_none"] = r["activation_bytes"] / none["activation_bytes"] if none else None
        for key, ratio in (("step_s", "time_vs_none"), ("cpu_s", "cpu_vs_none")):
            r[ratio] = r[key] / none[key] if none and none[key] and r[key] else None
        r["bytes_vs_tp1"] = r["activation_bytes"] / tp1["activation_bytes"] if tp1 else None


def goal_notes(r, rows):
    """The goals that apply to a row, each with its verdict."""
    notes = [f"formula {'ok' if abs(r['formula_ratio'] - 1) <= FORMULA_TOLERANCE else 'MISSED'}"]
    mode, bytes_ratio = r["recompute"], r["bytes_vs_none"]

    def time_note(goal):
        if r["time_vs_none"] is None:
            return None
        verdicts = [f"{name} {'ok' if r[key] <= goal else 'MISSED'}"
                    for name, key in (("wall", "time_vs_none"), ("cpu", "cpu_vs_none")) if r[key] is not None]
        return f"time<={goal} " + " ".join(verdicts)

    if mode == "full" and bytes_ratio is not None:
        notes.append(f"bytes<={FULL_BYTES} {'ok' if bytes_ratio <= FULL_BYTES else 'MISSED'}")
        notes.append(time_note(FULL_TIME))
    if mode == "selective" and bytes_ratio is not None:
        full = next((x for x in rows if (x["tp_size"], x["sequence_parallel"], x["recompute"])
                     == (r["tp_size"], r["sequence_parallel"], "full")), None)
        between = bytes_ratio < 1 and (full is None or full["activation_bytes"] < r["activation_bytes"])
        notes.append(f"between {'ok' if between else 'MISSED'}")
        notes.append(time_note(SELECTIVE_TIME))
    if r["tp_size"] == 4 and r["sequence_parallel"] and r["bytes_vs_tp1"] is not None:
        notes.append(f"vs tp1<={TP4_SP_BYTES} {'ok' if r['bytes_vs_tp1'] <= TP4_SP_BYTES else 'MISSED'}")
    return ", ".join(note for note in notes if note)


def print_table(rows, args):
    first = rows[0]
    print(f"step 13 activations per rank and micro-batch: {first['num_hidden_layers']} layers of "
          f"{Path(args.model_name).name}, micro-batch {args.micro_batch_size} x seq {args.seq_len}, {args.dtype}, "
          f"1 thread per rank, gloo on {cpu_name()}; step = forward + loss + backward, median of {args.steps} (wall, "
          "and CPU time)")
    header = (f"{'tp':>2} {'sp':>3} {'recompute':>9} {'measured MB':>11} {'formula MB':>10} {'meas/form':>9} "
              f"{'vs none':>7} {'vs tp1':>6} {'step s':>7} {'t/none':>6} {'cpu s':>6} {'c/none':>6}  goals")
    print(header)
    print("-" * len(header))
    for r in rows:
        def fmt(value, spec):
            return format(value, spec) if value is not None else "-"
        print(f"{r['tp_size']:>2} {'yes' if r['sequence_parallel'] else 'no':>3} {r['recompute']:>9} "
              f"{r['activation_bytes'] / 1e6:>11.3f} {r['formula_bytes'] / 1e6:>10.3f} {r['formula_ratio']:>9.4f} "
              f"{fmt(r['bytes_vs_none'], '>7.3f')} {fmt(r['bytes_vs_tp1'], '>6.3f')} {fmt(r['step_s'], '>7.3f')} "
              f"{fmt(r['time_vs_none'], '>6.2f')} {fmt(r['cpu_s'], '>6.3f')} {fmt(r['cpu_vs_none'], '>6.2f')}  "
              f"{goal_notes(r, rows)}")
        if r["ranks_differ_bytes"]:
            print(f"   (the ranks' bytes differ by {r['ranks_differ_bytes']}: the most is shown)")
    print(f"goals: measured within {FORMULA_TOLERANCE:.0%} of the formula; full <= {FULL_BYTES}x none's bytes at <= "
          f"{FULL_TIME}x its time; selective between full and none at <= {SELECTIVE_TIME}x; tp 4 + sp <= "
          f"{TP4_SP_BYTES}x tp 1 (same mode). Logits and loss not counted; the time ratios need a free core per rank")


def plot(rows, path, args):
    """Grouped bars: a group per tp / sp layout, a bar per recompute mode (measured MB), the formula as a marker
    on each bar, and the step time over none's above it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layouts = list(dict.fromkeys((r["tp_size"], r["sequence_parallel"]) for r in rows))
    modes = [m for m in RECOMPUTE if any(r["recompute"] == m for r in rows)]
    colors = {"none": "#4c72b0", "selective": "#dd8452", "full": "#55a868"}
    width = 0.8 / len(modes)
    fig, ax = plt.subplots(figsize=(10, 4.8))
    for j, mode in enumerate(modes):
        for i, layout in enumerate(layouts):
            r = next((x for x in rows if (x["tp_size"], x["sequence_parallel"], x["recompute"]) == (*layout, mode)),
                     None)
            if r is None:
                continue
            x = i + (j - (len(modes) - 1) / 2) * width
            ax.bar(x, r["activation_bytes"] / 1e6, width, color=colors[mode], label=mode if i == 0 else None)
            ax.plot([x], [r["formula_bytes"] / 1e6], marker="_", markersize=16, markeredgewidth=2, color="black",
                    label="formula" if (i, j) == (0, 0) else None)
            if r["time_vs_none"] is not None and mode != "none":
                ax.annotate(f"{r['time_vs_none']:.2f}x\n{r['cpu_vs_none']:.2f}x", (x, r["activation_bytes"] / 1e6),
                            ha="center", va="bottom", fontsize=7, xytext=(0, 2), textcoords="offset points")
    ax.set_xticks(range(len(layouts)))
    ax.set_xticklabels([f"tp {tp}" + (" + sp" if sp else "") for tp, sp in layouts])
    ax.set_ylabel("activations kept for backward, MB per rank")
    ax.set_title(f"Step 13: activation memory per rank and micro-batch ({rows[0]['num_hidden_layers']} layers, "
                 f"{args.micro_batch_size} x {args.seq_len} tokens, {args.dtype})\nabove a bar: its step's wall "
                 "time / none's, then its CPU time / none's",
                 fontsize=10)
    ax.legend(title="--recompute")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    if args.steps < 0:
        raise SystemExit("--steps must be 0 or more")
    torch.set_num_threads(1)
    rows = run(args)
    if args.json:
        for r in rows:
            print(json.dumps(r), flush=True)
    else:
        print_table(rows, args)
    if args.plot:
        plot(rows, args.plot, args)


if __name__ == "__main__":
    main()
