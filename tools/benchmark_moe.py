"""Step 15's mixture of experts measured: our Llama with Mixtral's sparse MoE blocks against transformers'
MixtralForCausalLM, the bytes expert parallelism hands to all-to-all against the step's formula, the experts'
parameters each rank holds, and (--plot) the share of tokens each expert takes over a run with and without the
load-balancing loss. The model is assets/tiny_mixtral (4 layers, hidden 256, 8 experts of intermediate 256, top-2,
router_aux_loss_coef 0.02), fp32 on the CPU.

1. Ours against transformers, in this process. MixtralForCausalLM(config) is built from the seed
   (config.output_router_logits = True: its loss is cross-entropy + router_aux_loss_coef x its load-balancing loss)
   and its weights copied into our Llama(config) (load_hf_state_dict). Both train on the same random batches
   ([micro_batch_size, seq_len] tokens from a fixed generator) with torch.optim.AdamW (the same lr, no weight decay);
   transformers shifts the labels itself, so both predict tokens 1..seq-1 from the ones before, and our loss is
   cross-entropy + coef x moe.balance_loss(moe.moe_blocks(model)), as step 15's train.py adds it. The first warm-up
   step's losses must agree within 1e-5 (the tool stops otherwise: a timing of two different computations is
   meaningless). The two take turns, one step each, the order alternating; after --warmup steps:
       ours_step_s, hf_step_s   the median seconds per training step (forward, loss, backward, AdamW)
       step_time_ratio          the median of the paired per-step ratios ours / transformers (each pair of steps
                                sees the same load on a busy machine); goal <= 1.0
       cpu_time_ratio           the same in CPU seconds (time.process_time; ours_cpu_s, hf_cpu_s): what each
                                costs when other processes share the cores and the wall times scatter
       max_abs_dloss            the largest |loss ours - loss transformers| over every step; goal <= 1e-4
   transformers runs its experts as config._experts_implementation says (printed; "grouped_mm" by default in
   transformers 5), ours one matmul per weight and expert on the expert's contiguous block of tokens (moe.py).

2. Expert-parallel bytes. step15_expert_parallel/train.py under torchrun, 2 processes, --dp_size 2 --ep_size 2,
   --metrics_file in a temporary folder; each step's `alltoall_bytes` is what the ranks of the ep group handed to
   all-to-all during the step, their mean (train.py logs it; `alltoall_bytes_max`: the busiest rank's). The first
   step is left out, the rest averaged: `alltoall_bytes` and `alltoall_bytes_max`, beside the formula of
   expert_parallel.py's docstring, per rank, MoE layer and micro-batch:
       4 x (micro_batch_size x seq_len) x k x hidden x 4 bytes (fp32)   dispatch and combine, forward and backward
       + num_local_experts x 8 bytes                                     the int64 counts, once, forward
   times layers x gradient_accumulation_steps per step (`alltoall_bytes_formula`); goal: measured / formula within
   0.95..1.05 (`alltoall_bytes_ratio`; `alltoall_bytes_max_ratio` beside it, no goal).
   That is the mean over the ep group: a rank hands on its own (token, choice) pairs (dispatch, and combine's
   backward) and the pairs its experts received from every rank (combine, and dispatch's backward), so one rank's
   bytes follow its experts' load. Each rank's is checked too: the same layers on both ranks of an ep group, one
   step of the same shape (a gloo group of 2 processes: Llama(config) from the seed, apply_expert_parallel, forward
   and backward), each rank's expert_parallel.alltoall_bytes (`alltoall_bytes_ranks`) beside 2 x its own pairs +
   2 x the pairs its experts received (counted from the routers' choices, all-reduced) x hidden x 4 bytes + the
   counts (`alltoall_bytes_rank_formula`).

3. Memory. The experts' parameters: per layer E x (2 x intermediate x hidden + hidden x intermediate), all layers
   (`expert_params_total`); each rank of an ep group holds E / ep_size of every layer's experts
   (`expert_params_per_rank` = total / ep_size, computed from the config) and `expert_params_share` = per rank /
   total (goal 1 / ep_size); the gloo run above counts the numels of mlp.experts.* each rank actually holds
   (`expert_params_built`) and the whole model's parameters per rank against one process's.

4. --plot [PATH] (default assets/moe_tokens_per_expert.png): two one-process runs of step 15's train.py, side by
   side on the 2 cores, --balance_steps (200) steps of 4 x 64 tokens at the default learning rate, with
   --router_aux_loss_coef 0 and --balance_coef (1.0); each step's tokens_per_expert (the (token, choice) pairs
   each expert of each layer took) and aux_loss read from --metrics_file. Drawn: each expert's share of the pairs
   over the steps, one panel per layer and run, the even share 1/E dashed; in a last column the spread of the
   shares (std / mean, 0 when even) and the balance loss (k = 2 when even) of both runs. Both runs collapse at
   first (one expert takes every token of a layer: share 0.5 at k = 2) and spread out again; with the loss,
   faster and closer to 1/E. The PNG in assets/ was made by

       python tools/benchmark_moe.py --plot

It measures, it never asserts (but for the first-step loss check of part 1). --json prints one JSON object.

    python tools/benchmark_moe.py                   # the table, ~1-2 minutes on 2 free cores
    python tools/benchmark_moe.py --plot            # and the picture, ~1-2 minutes more
    python tools/benchmark_moe.py --json            # one JSON object
    python tools/benchmark_moe.py --steps 2 --warmup 1 --seq_len 64 --ep_steps 2 --ep_seq_len 32 --json  # quick
"""
import argparse
import io
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from transformers import AutoConfig, MixtralForCausalLM

from lib.measure import cpu_name, free_port
from lib.steps import ROOT, use_step

STEP_DIR = use_step("step15_expert_parallel")
import expert_parallel  # noqa: E402
import moe  # noqa: E402
import process_group_manager as pgm  # noqa: E402
from model import Llama  # noqa: E402

MODEL = ROOT / "assets" / "tiny_mixtral"
EP_SIZE = 2
BYTES_PER_VALUE = 4  # fp32
COUNT_BYTES = 8  # int64
FIRST_LOSS_TOLERANCE = 1e-5  # the parity contract's first step: beyond it the two compute different things
BALANCE_BATCH = (4, 64)  # the plot's runs: micro-batch, seq_len (no gradient accumulation)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed training steps of each model (part 1)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (part 1)")
    parser.add_argument("--micro_batch_size", type=int, default=4, help="part 1's batch")
    parser.add_argument("--seq_len", type=int, default=128, help="part 1's sequence length")
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="part 1's torch threads")
    parser.add_argument("--ep_steps", type=int, default=4, help="optimizer steps of the ep 2 run (part 2)")
    parser.add_argument("--ep_micro_batch_size", type=int, default=2)
    parser.add_argument("--ep_seq_len", type=int, default=64)
    parser.add_argument("--ep_grad_acc", type=int, default=2, help="the ep run's gradient accumulation steps")
    parser.add_argument("--plot", nargs="?", const=str(ROOT / "assets" / "moe_tokens_per_expert.png"), default=None,
                        metavar="PATH", help="draw the tokens per expert of two real runs into PATH (default "
                                             "assets/moe_tokens_per_expert.png)")
    parser.add_argument("--balance_coef", type=float, default=1.0, help="the plot's run with the balance loss")
    parser.add_argument("--balance_steps", type=int, default=200, help="steps of each of the plot's runs")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return parser.parse_args()


def moe_config():
    config = AutoConfig.from_pretrained(MODEL)
    config.output_router_logits = True  # transformers adds router_aux_loss_coef x the balance loss to its loss
    return config


# ---- 1. ours against transformers ----

def our_loss(model, input_ids, coef):
    """Cross-entropy of tokens 1..seq-1 (transformers' shift) + coef x the load-balancing loss, as train.py adds it."""
    logits = model(input_ids)  # [batch, seq, vocab]
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), input_ids[:, 1:].reshape(-1))
    return loss + coef * moe.balance_loss(moe.moe_blocks(model))


def train_step(loss_of, optimizer, input_ids):
    """Returns the loss, and the step's wall and CPU seconds."""
    start, start_cpu = time.perf_counter(), time.process_time()
    optimizer.zero_grad()
    loss = loss_of(input_ids)
    loss.backward()
    optimizer.step()
    return loss.item(), time.perf_counter() - start, time.process_time() - start_cpu


def compare_with_transformers(args):
    torch.set_num_threads(args.threads)
    config = moe_config()
    torch.manual_seed(0)
    theirs = MixtralForCausalLM(config)
    ours = Llama(config)
    ours.load_hf_state_dict(theirs.state_dict())
    coef = config.router_aux_loss_coef
    contestants = {
        "ours": (lambda ids: our_loss(ours, ids, coef), torch.optim.AdamW(ours.parameters(), lr=args.learning_rate,
                                                                           weight_decay=0.0)),
        "hf": (lambda ids: theirs(input_ids=ids, labels=ids, use_cache=False).loss,
               torch.optim.AdamW(theirs.parameters(), lr=args.learning_rate, weight_decay=0.0)),
    }
    generator = torch.Generator().manual_seed(1)
    batches = torch.randint(config.vocab_size, (args.warmup + args.steps, args.micro_batch_size, args.seq_len),
                            generator=generator)
    losses, seconds, cpu_seconds = ({name: [] for name in contestants} for _ in range(3))
    for step, batch in enumerate(batches):
        for name in (("ours", "hf") if step % 2 == 0 else ("hf", "ours")):  # take turns going first
            loss, elapsed, elapsed_cpu = train_step(*contestants[name], batch)
            losses[name].append(loss)
            if step >= args.warmup:  # the first steps pay for allocations
                seconds[name].append(elapsed)
                cpu_seconds[name].append(elapsed_cpu)
        if step == 0 and abs(losses["ours"][0] - losses["hf"][0]) > FIRST_LOSS_TOLERANCE:
            sys.exit(f"error: the first losses differ: ours {losses['ours'][0]:.8f}, transformers "
                     f"{losses['hf'][0]:.8f}; the two do not compute the same step, so their times are not compared")
    ratios = [a / b for a, b in zip(seconds["ours"], seconds["hf"])]
    return {
        "ours_step_s": statistics.median(seconds["ours"]), "hf_step_s": statistics.median(seconds["hf"]),
        "step_time_ratio": statistics.median(ratios), "step_time_ratio_range": [min(ratios), max(ratios)],
        "ours_cpu_s": statistics.median(cpu_seconds["ours"]), "hf_cpu_s": statistics.median(cpu_seconds["hf"]),
        "cpu_time_ratio": statistics.median(a / b for a, b in zip(cpu_seconds["ours"], cpu_seconds["hf"])),
        "ours_losses": losses["ours"], "hf_losses": losses["hf"],
        "first_abs_dloss": abs(losses["ours"][0] - losses["hf"][0]),
        "max_abs_dloss": max(abs(a - b) for a, b in zip(losses["ours"], losses["hf"])),
        "hf_experts_implementation": getattr(config, "_experts_implementation", None),
        "threads": args.threads,
    }


# ---- 2. expert-parallel bytes ----

def torchrun_env():
    return dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
                HF_DATASETS_OFFLINE="1")


def train_command(nproc, *flags):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            str(STEP_DIR / "train.py"), "--model_name", str(MODEL), *[str(flag) for flag in flags]]


def read_metrics(proc, command, metrics_path):
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return [json.loads(line) for line in Path(metrics_path).read_text().splitlines()]


def alltoall_formula(config, micro_batch_size, seq_len, grad_acc_steps):
    """expert_parallel.py's bytes per rank and optimizer step, summed over the MoE layers and micro-batches."""
    tokens = micro_batch_size * seq_len
    per_layer = (4 * tokens * config.num_experts_per_tok * config.hidden_size * BYTES_PER_VALUE
                 + config.num_local_experts * COUNT_BYTES)
    return per_layer * config.num_hidden_layers * grad_acc_steps


def measure_train_bytes(args, folder):
    """train.py at dp 2, ep 2: each step's all-to-all bytes per rank, the ep group's mean and its busiest rank's,
    the first step left out."""
    metrics_path = Path(folder) / "ep2.jsonl"
    tokens_per_step = EP_SIZE * args.ep_grad_acc * args.ep_micro_batch_size * args.ep_seq_len
    command = train_command(EP_SIZE, "--dp_size", EP_SIZE, "--ep_size", EP_SIZE, "--micro_batch_size",
                            args.ep_micro_batch_size, "--gradient_accumulation_steps", args.ep_grad_acc, "--seq_len",
                            args.ep_seq_len, "--max_tokens", args.ep_steps * tokens_per_step,
                            "--metrics_file", metrics_path)
    proc = subprocess.run(command, cwd=ROOT, env=torchrun_env(), capture_output=True, text=True)
    metrics = read_metrics(proc, command, metrics_path)
    metrics = metrics[1:] if len(metrics) > 1 else metrics
    return [m["alltoall_bytes"] for m in metrics], [m["alltoall_bytes_max"] for m in metrics]


def ep_worker(rank, port, args, result_dir):
    """One rank of an ep group of 2: step 15's model at ep 2 (this rank's experts), the ep run's micro-batches
    forward and backward; its bytes handed to all-to-all and the parameters it holds."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=EP_SIZE)
    pgm.setup_process_group_manager(tp_size=1, cp_size=1, pp_size=1, dp_size=EP_SIZE, ep_size=EP_SIZE)
    config = moe_config()
    torch.manual_seed(0)  # every rank builds the whole model from the seed, then keeps its experts
    model = expert_parallel.apply_expert_parallel(Llama(config), sequence_parallel=False)
    generator = torch.Generator().manual_seed(1 + rank)  # each dp rank reads its own sequences
    blocks, mine = moe.moe_blocks(model), config.num_local_experts // EP_SIZE
    expert_parallel.alltoall_bytes_per_rank()  # a count from zero
    pairs = 0  # the (token, choice) pairs this rank handed on: its own, and those its experts received, twice each
    for _ in range(args.ep_grad_acc):
        tokens = torch.randint(config.vocab_size, (args.ep_micro_batch_size, args.ep_seq_len), generator=generator)
        loss = our_loss(model, tokens, config.router_aux_loss_coef)
        routed = torch.stack([block.router_stats[0] for block in blocks])  # [layers, E] this rank's pairs
        everyone_routed = routed.clone()
        dist.all_reduce(everyone_routed)  # every rank's (not through all_to_all: not counted)
        received = everyone_routed[:, rank * mine:(rank + 1) * mine].sum()
        pairs += 2 * routed.sum().item() + 2 * received.item()
        loss.backward()
    counts = len(blocks) * args.ep_grad_acc * config.num_local_experts * COUNT_BYTES
    this_rank = {"bytes": expert_parallel.alltoall_bytes,
                 "rank_formula": int(pairs) * config.hidden_size * BYTES_PER_VALUE + counts,
                 "expert_params": sum(p.numel() for name, p in model.named_parameters() if ".mlp.experts." in name),
                 "params": sum(p.numel() for p in model.parameters())}
    everyone = [None] * EP_SIZE
    dist.all_gather_object(everyone, this_rank)
    if rank == 0:
        (Path(result_dir) / "ep.json").write_text(json.dumps(everyone))
    dist.barrier()
    dist.destroy_process_group()


def measure_group_bytes(args, folder):
    mp.spawn(ep_worker, args=(free_port(), args, folder), nprocs=EP_SIZE)
    return json.loads((Path(folder) / "ep.json").read_text())


def expert_parallel_results(args, folder):
    config = moe_config()
    formula = alltoall_formula(config, args.ep_micro_batch_size, args.ep_seq_len, args.ep_grad_acc)
    mean, busiest = measure_train_bytes(args, folder)
    ranks = measure_group_bytes(args, folder)
    per_expert = 3 * config.intermediate_size * config.hidden_size  # gate, up and down
    total = config.num_hidden_layers * config.num_local_experts * per_expert
    whole_model = sum(p.numel() for p in Llama(config).parameters())
    return {
        "alltoall_bytes": statistics.fmean(mean), "alltoall_bytes_per_step": mean,
        "alltoall_bytes_formula": formula, "alltoall_bytes_ratio": statistics.fmean(mean) / formula,
        "alltoall_bytes_max": statistics.fmean(busiest), "alltoall_bytes_max_per_step": busiest,
        "alltoall_bytes_max_ratio": statistics.fmean(busiest) / formula,
        "alltoall_bytes_ranks": [r["bytes"] for r in ranks],
        "alltoall_bytes_rank_formula": [r["rank_formula"] for r in ranks],
        "expert_params_total": total, "expert_params_per_rank": total // EP_SIZE,
        "expert_params_share": (total // EP_SIZE) / total,
        "expert_params_built": [r["expert_params"] for r in ranks],
        "params_per_rank": [r["params"] for r in ranks], "params_one_process": whole_model,
        "ep_size": EP_SIZE, "ep_run": {"micro_batch_size": args.ep_micro_batch_size, "seq_len": args.ep_seq_len,
                                       "gradient_accumulation_steps": args.ep_grad_acc, "steps": args.ep_steps},
    }


# ---- 4. tokens per expert, with and without the balance loss ----

def balance_runs(args, folder):
    """{coef: each step's metrics} of two one-process runs, launched together."""
    runs = {}
    for coef in (0.0, args.balance_coef):
        metrics_path = Path(folder) / f"coef{coef}.jsonl"
        command = train_command(1, "--router_aux_loss_coef", coef, "--micro_batch_size", BALANCE_BATCH[0],
                                "--seq_len", BALANCE_BATCH[1], "--gradient_accumulation_steps", 1,
                                "--max_tokens", args.balance_steps * BALANCE_BATCH[0] * BALANCE_BATCH[1],
                                "--metrics_file", metrics_path)
        popen = subprocess.Popen(command, cwd=ROOT, env=torchrun_env(), text=True, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE)
        runs[coef] = (command, metrics_path, popen)
    metrics = {}
    for coef, (command, metrics_path, popen) in runs.items():
        stdout, stderr = popen.communicate()
        metrics[coef] = read_metrics(subprocess.CompletedProcess(command, popen.returncode, stdout, stderr), command,
                                     metrics_path)
    return metrics


def shares(metrics):
    """Each step's tokens_per_expert as fractions of each layer's pairs: [steps][layers][experts]."""
    return [[[count / sum(layer) for count in layer] for layer in m["tokens_per_expert"]] for m in metrics]


def spread(layer_shares):
    """The shares' standard deviation / their mean (1/E): 0 when every expert takes the same share."""
    return statistics.pstdev(layer_shares) * len(layer_shares)


def balance_summary(runs, last=20):
    """Per run, over its last steps and every layer: the mean largest expert share and the mean spread."""
    summary = {}
    for coef, metrics in runs.items():
        tail = [layer for step in shares(metrics)[-last:] for layer in step]
        summary[str(coef)] = {"max_share": statistics.fmean(max(layer) for layer in tail),
                              "spread": statistics.fmean(spread(layer) for layer in tail),
                              "aux_loss": statistics.fmean(m["aux_loss"] for m in metrics[-last:])}
    return summary


def plot(runs, path, num_experts):
    """One panel per layer and run: each expert's share of the pairs over the steps; a last column with the spread
    (mean over layers) and the balance loss of both runs."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image  # matplotlib's own dependency

    coefs = list(runs)
    series = {coef: shares(runs[coef]) for coef in coefs}  # [steps][layers][experts]
    layers = len(series[coefs[0]][0])
    fig, axes = plt.subplots(len(coefs), layers + 1, figsize=(3.1 * (layers + 1), 2.9 * len(coefs)), sharex=True)
    colors = plt.get_cmap("tab10")
    top = max(share for run in series.values() for step in run for layer in step for share in layer)
    for row, coef in enumerate(coefs):
        steps = range(1, len(series[coef]) + 1)
        for layer in range(layers):
            ax = axes[row][layer]
            for expert in range(num_experts):
                ax.plot(steps, [step[layer][expert] for step in series[coef]], color=colors(expert), linewidth=0.8,
                        label=f"expert {expert}")
            ax.axhline(1 / num_experts, color="black", linestyle="--", linewidth=1.2,
                       label=f"even share 1/{num_experts}")
            ax.set_ylim(0, top * 1.05)
            ax.set_title(f"layer {layer}, coef {coef:g}", fontsize=9)
            if layer == 0:
                ax.set_ylabel("share of (token, choice) pairs")
    for coef in coefs:
        steps = range(1, len(series[coef]) + 1)
        color = "tab:red" if coef == 0 else "tab:blue"
        axes[0][layers].plot(steps, [statistics.fmean(spread(layer) for layer in step) for step in series[coef]],
                             color=color, linewidth=0.9, label=f"coef {coef:g}")
        axes[1][layers].plot(steps, [m["aux_loss"] for m in runs[coef]], color=color, linewidth=0.9,
                             label=f"coef {coef:g}")
    axes[0][layers].set_title("spread of the shares (std / mean),\nmean over layers; even: 0", fontsize=9)
    axes[0][layers].set_ylim(bottom=0)
    axes[1][layers].set_title("balance loss (aux_loss); even: k = 2", fontsize=9)
    for ax in axes[:, layers]:
        ax.legend(fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("optimizer step")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=num_experts + 1, fontsize=8, frameon=False)
    fig.suptitle("tiny_mixtral, one process: tokens per expert without (top) and with (bottom) the load-balancing "
                 "loss (step 15's train.py --router_aux_loss_coef; tools/benchmark_moe.py --plot)", fontsize=10)
    fig.tight_layout(rect=(0, 0.05, 1, 0.96))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    # 64 colours are plenty for 8 experts' lines; the full-colour file of these wiggly lines is 3.5x as large
    Image.open(buffer).convert("RGB").quantize(colors=64).save(path, optimize=True)


# ---- output ----

def goal_row(name, measured, goal="", ratio="", met=None):
    verdict = "" if met is None else "ok" if met else "MISS"
    return f"{name:<34} {measured:>16} {goal:>22} {ratio:>10}  {verdict}".rstrip()


def print_table(result, args):
    config = moe_config()
    print(f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, fp32 | tiny_mixtral: hidden "
          f"{config.hidden_size}, {config.num_hidden_layers} layers, {config.num_local_experts} experts of "
          f"intermediate {config.intermediate_size}, top-{config.num_experts_per_tok}, vocab {config.vocab_size}")
    print(f"1. ours vs transformers (experts: {result['hf_experts_implementation']}): batch {args.micro_batch_size}x"
          f"{args.seq_len}, AdamW lr {args.learning_rate}, {args.steps} timed steps after {args.warmup}, taking turns, "
          f"{result['threads']} thread(s)")
    print(f"2. train.py at dp {EP_SIZE} x ep {EP_SIZE}: micro-batch {args.ep_micro_batch_size}x{args.ep_seq_len}, "
          f"grad acc {args.ep_grad_acc}, {args.ep_steps} steps (the first left out)")
    print()
    print(f"{'':<34} {'measured':>16} {'goal':>22} {'ratio':>10}")
    low, high = result["step_time_ratio_range"]
    print(goal_row("ours s/step (median)", f"{result['ours_step_s']:.4f}", "", f"cpu {result['ours_cpu_s']:.4f}"))
    print(goal_row("transformers s/step (median)", f"{result['hf_step_s']:.4f}", "", f"cpu {result['hf_cpu_s']:.4f}"))
    print(goal_row("ours / transformers time", f"{result['step_time_ratio']:.3f}", "<= 1.0", f"{low:.2f}-{high:.2f}",
                   result["step_time_ratio"] <= 1.0))
    print(goal_row("  in CPU seconds (process_time)", f"{result['cpu_time_ratio']:.3f}", "<= 1.0", "",
                   result["cpu_time_ratio"] <= 1.0))
    print(goal_row("max |loss ours - transformers|", f"{result['max_abs_dloss']:.2e}", "<= 1e-4",
                   f"{result['max_abs_dloss'] / 1e-4:.2g}x", result["max_abs_dloss"] <= 1e-4))
    formula = f"{result['alltoall_bytes_formula']} (formula)"
    print(goal_row("all-to-all bytes/rank/step", f"{result['alltoall_bytes']:.0f}", formula,
                   f"{result['alltoall_bytes_ratio']:.3f}", 0.95 <= result["alltoall_bytes_ratio"] <= 1.05))
    print(goal_row("  the busiest rank's", f"{result['alltoall_bytes_max']:.0f}", "",
                   f"{result['alltoall_bytes_max_ratio']:.3f}"))
    share = result["expert_params_share"]
    print(goal_row("expert parameters per rank", f"{result['expert_params_per_rank']}",
                   f"{result['expert_params_total']} / {EP_SIZE}", f"{share:.3f}", math.isclose(share, 1 / EP_SIZE)))
    print()
    exact = result["alltoall_bytes_ranks"] == result["alltoall_bytes_rank_formula"]
    print(f"all-to-all bytes: train.py logs the ep group's mean per rank (steps 2..{args.ep_steps}: "
          f"{[int(b) for b in result['alltoall_bytes_per_step']]}) and its busiest rank's "
          f"({[int(b) for b in result['alltoall_bytes_max_per_step']]}).")
    print(f"One step of the same layers on both ranks of an ep group: {result['alltoall_bytes_ranks']} bytes, 2 x own "
          f"+ 2 x received pairs: {result['alltoall_bytes_rank_formula']} ({'equal' if exact else 'NOT EQUAL'}).")
    print()
    print(f"memory at ep {EP_SIZE}, parameters per rank (fp32; AdamW adds 3x as many bytes again: gradient, 2 moments)")
    print(f"{'':<22} {'one process':>12} {'ep rank 0':>12} {'ep rank 1':>12} {'share':>7} {'goal':>7}")
    built = result["expert_params_built"]
    print(f"{'experts':<22} {result['expert_params_total']:>12} {built[0]:>12} {built[1]:>12} "
          f"{built[0] / result['expert_params_total']:>7.3f} {f'1/{EP_SIZE}':>7}")
    rest = result["params_one_process"] - result["expert_params_total"]
    print(f"{'the rest (replicated)':<22} {rest:>12} {result['params_per_rank'][0] - built[0]:>12} "
          f"{result['params_per_rank'][1] - built[1]:>12} {1:>7.3f} {1:>7}")
    print(f"{'whole model':<22} {result['params_one_process']:>12} {result['params_per_rank'][0]:>12} "
          f"{result['params_per_rank'][1]:>12} {result['params_per_rank'][0] / result['params_one_process']:>7.3f}")
    if "balance" in result:
        print()
        print(f"tokens per expert, one process, {args.balance_steps} steps of {BALANCE_BATCH[0]}x{BALANCE_BATCH[1]} "
              f"tokens (drawn into {args.plot}); the last 20 steps, every layer: the largest expert's share (even: "
              f"1/{config.num_local_experts} = {1 / config.num_local_experts:.3f}) and the shares' spread (std / "
              f"mean, even: 0)")
        for coef, summary in result["balance"].items():
            print(f"  --router_aux_loss_coef {coef:<5} largest share {summary['max_share']:.3f}, spread "
                  f"{summary['spread']:.2f}")


def main():
    args = parse_args()
    result = compare_with_transformers(args)
    with tempfile.TemporaryDirectory() as folder:
        result.update(expert_parallel_results(args, folder))
        if args.plot:
            runs = balance_runs(args, folder)
            plot(runs, args.plot, moe_config().num_local_experts)
            result["balance"] = balance_summary(runs)
            result["plot"] = args.plot
    if args.json:
        print(json.dumps(result))
    else:
        print_table(result, args)


if __name__ == "__main__":
    main()
