"""One command that validates a machine with one GPU (under 10 minutes) and writes a markdown report.

1. Every step folder (step1_*, step2_*, ... whatever exists) trains through torchrun on the device with all
   parallel sizes 1, in bf16, as a learner would run it: its loss must fall.
2. Our model's fp32 logits on the device equal the CPU's within 1e-4: the device's kernels (matmuls,
   scaled_dot_product_attention) compute the same function as the CPU's.
3. A TinyLlama-1B-shaped model (22 layers, hidden 2048, intermediate 5632, 32 heads, 4 kv heads) in bf16:
   tokens/s, MFU and peak memory of our Llama and of transformers' LlamaForCausalLM with the same weights,
   batch, dtype and optimizer, their steps interleaved so both see the same machine; the ratio of their speeds.
   Goals on an H100: ours at least 1.0x transformers', MFU at least 40%.

Checks 1 and 2 decide the exit status; the goals of 3 are reported, not enforced.

    python tools/gpu_check.py --report assets/gpu_check.md
    python tools/gpu_check.py --device cpu --toy --steps 1 8     # the tool itself, in a minute on a CPU
"""
import argparse
import datetime
import importlib
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

from lib.steps import ROOT, use_step

STEP_FOLDERS = {int(re.match(r"step(\d+)_", path.name).group(1)): path
                for path in ROOT.glob("step*_*") if path.is_dir() and re.match(r"step\d+_", path.name)}
LOGITS_TOLERANCE = 1e-4


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--report", type=Path, default=None, help="write the markdown report here (also printed)")
    parser.add_argument("--steps", type=int, nargs="+", default=sorted(STEP_FOLDERS), help="default: every step")
    parser.add_argument("--model_step", type=int, default=max(STEP_FOLDERS),
                        help="the step whose model.py and utils.py checks 2 and 3 use (default: the newest)")
    parser.add_argument("--seq_len", type=int, default=2048, help="of the 1B benchmark")
    parser.add_argument("--micro_batch_size", type=int, default=4, help="of the 1B benchmark")
    parser.add_argument("--bench_steps", type=int, default=10, help="timed steps per model, after 2 warm-up steps")
    parser.add_argument("--toy", action="store_true",
                        help="a 2-layer, hidden-128 benchmark model and 4-step runs: to check the tool on a CPU")
    return parser.parse_args()


def run_step(number, args, workdir):
    """Train one step folder through torchrun on the device, bf16, all parallel sizes 1, the embedded tiny
    model and corpus. Returns a dict of its results."""
    folder = STEP_FOLDERS[number]
    seq_len, micro_batch_size, tokens = (32, 2, 512) if args.toy else (128, 8, 61440)  # 4 and 30 steps from step 3
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
               str(folder / "train.py"), "--device", args.device, "--dtype", "bfloat16", "--seq_len", str(seq_len),
               "--micro_batch_size", str(micro_batch_size), "--max_tokens", str(tokens)]
    metrics_file = workdir / f"{folder.name}.jsonl"
    has_metrics = "--metrics_file" in (folder / "train.py").read_text()  # steps 1 and 2 only print
    if has_metrics:
        command += ["--metrics_file", str(metrics_file)]
    start = time.time()
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    row = {"step": folder.name, "ok": False, "seconds": time.time() - start, "losses": [], "tokens_per_second": None,
           "mfu": None, "error": None}
    if result.returncode != 0:
        row["error"] = (result.stderr.strip().splitlines() or ["no output"])[-1]
        return row
    if has_metrics:
        metrics = [json.loads(line) for line in metrics_file.read_text().splitlines()]
        row["losses"] = [m["loss"] for m in metrics]
        row["tokens_per_second"] = statistics.median(m["tokens_per_second"] for m in metrics)
        row["mfu"] = statistics.median(m["mfu"] for m in metrics)
    else:
        row["losses"] = [float(loss) for loss in re.findall(r"Step: *\d+ *\| Loss: ([\d.]+)", result.stdout)]
    # bf16 noise is far below this: a step that learns nothing, or diverges, does not pass.
    row["ok"] = len(row["losses"]) >= 2 and row["losses"][-1] < 0.95 * row["losses"][0]
    return row


def import_step(number):
    """model and utils of one step folder (each step imports its siblings as top-level modules); from step 10 on
    the metrics (FLOPs, peak, formatting) are in metrics.py, before it in utils.py."""
    use_step(STEP_FOLDERS[number].name)
    import model
    import utils
    metrics = importlib.import_module("metrics") if (STEP_FOLDERS[number] / "metrics.py").exists() else utils
    return model, SimpleNamespace(load_config=utils.load_config, flops_per_token=metrics.flops_per_token,
                                  peak_flops_per_device=metrics.peak_flops_per_device,
                                  to_readable_format=metrics.to_readable_format)


def check_logits(model_module, utils, device):
    """Max |logits on device - logits on CPU| in fp32, for the embedded tiny model with the same weights."""
    config = utils.load_config(argparse.Namespace(model_name=str(ROOT / "assets" / "tiny_llama"), seq_len=128))
    torch.manual_seed(0)
    model = model_module.Llama(config)
    input_ids = torch.randint(0, config.vocab_size, (2, 128))
    with torch.no_grad():
        on_cpu = model(input_ids)  # [batch, seq, vocab]
        on_device = model.to(device)(input_ids.to(device)).cpu()
    return (on_device - on_cpu).abs().max().item()


def benchmark(model_module, utils, args, device):
    """Our Llama against transformers' LlamaForCausalLM, same weights, batches, dtype and optimizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(num_hidden_layers=22, hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000)
    seq_len, micro_batch_size = args.seq_len, args.micro_batch_size
    if args.toy:
        shape = dict(num_hidden_layers=2, hidden_size=128, intermediate_size=352, num_attention_heads=4,
                     num_key_value_heads=2, vocab_size=1000)
        seq_len, micro_batch_size = 64, 2
    config = LlamaConfig(**shape, max_position_embeddings=seq_len, rms_norm_eps=1e-5, tie_word_embeddings=False)
    dtype = torch.bfloat16
    torch.manual_seed(0)
    with torch.device(device):
        theirs = LlamaForCausalLM(config)
        ours = model_module.Llama(config)
    ours.load_hf_state_dict(theirs.state_dict())
    theirs, ours = theirs.to(dtype), ours.to(dtype)
    models = {
        "ours": (lambda ids: ours(ids), torch.optim.AdamW(ours.parameters(), lr=1e-5)),
        "transformers": (lambda ids: theirs(input_ids=ids).logits, torch.optim.AdamW(theirs.parameters(), lr=1e-5)),
    }
    batches = [torch.randint(0, config.vocab_size, (micro_batch_size, seq_len + 1), device=device)
               for _ in range(args.bench_steps + 2)]
    seconds = {name: 0.0 for name in models}
    step_memory = {name: 0.0 for name in models}
    for i, batch in enumerate(batches):
        for name in (list(models) if i % 2 == 0 else list(models)[::-1]):  # take turns going first
            forward, optimizer = models[name]
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                resident = torch.cuda.memory_allocated(device)
            start = time.perf_counter()
            logits = forward(batch[:, :-1])  # [batch, seq, vocab]
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), batch[:, 1:].reshape(-1)).backward()
            optimizer.step()
            optimizer.zero_grad()  # frees the gradients: between steps only weights and optimizer states stay
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                step_memory[name] = max(step_memory[name], torch.cuda.max_memory_allocated(device) - resident)
            if i >= 2:  # the first steps pay for allocations, kernel selection and the optimizer's state
                seconds[name] += time.perf_counter() - start

    peak_flops, peak_source = utils.peak_flops_per_device(device, dtype)
    flops_per_token = utils.flops_per_token(config, seq_len)
    tokens = args.bench_steps * micro_batch_size * seq_len
    rows = {}
    for name in models:
        tokens_per_second = tokens / seconds[name]
        rows[name] = {"tokens_per_second": tokens_per_second, "mfu": tokens_per_second * flops_per_token / peak_flops,
                      "step_memory_gb": step_memory[name] / 1e9 if device.type == "cuda" else None}
    params = sum(p.numel() for p in ours.parameters())
    return {"shape": shape, "seq_len": seq_len, "micro_batch_size": micro_batch_size, "params": params,
            "flops_per_token": flops_per_token, "peak_tflops": peak_flops / 1e12, "peak_source": peak_source,
            "attention": theirs.config._attn_implementation, "rows": rows,
            "ratio": seconds["transformers"] / seconds["ours"]}


def report(device, steps, logits_diff, bench, readable):
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    lines = [f"# GPU check: {name}", "",
             f"{datetime.date.today()} | torch {torch.__version__} | CUDA {torch.version.cuda} | "
             f"`python tools/gpu_check.py {' '.join(sys.argv[1:])}`", "",
             f"## 1. Every step on {device.type}, all parallel sizes 1, bf16, its loss falls", "",
             "| step | first loss | last loss | falls | tokens/s | MFU | seconds |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row in steps:
        first, last = (f"{row['losses'][0]:.4f}", f"{row['losses'][-1]:.4f}") if row["losses"] else ("-", "-")
        speed = f"{row['tokens_per_second']:.0f}" if row["tokens_per_second"] else "-"
        mfu = f"{row['mfu']:.1%}" if row["mfu"] is not None else "-"
        verdict = "yes" if row["ok"] else f"**NO** {row['error'] or ''}"
        lines.append(f"| {row['step']} | {first} | {last} | {verdict} | {speed} | {mfu} | {row['seconds']:.0f} |")
    verdict = "pass" if logits_diff <= LOGITS_TOLERANCE else "**FAIL**"
    lines += ["", "Steps 1 and 2 train on one random batch and print no throughput; tokens/s and MFU are the "
              "median over the run's steps (tiny model: far from the device's peak).", "",
              f"## 2. fp32 logits of our model, {device.type} against the CPU", "",
              f"max abs difference {logits_diff:.2e} (tolerance {LOGITS_TOLERANCE:.0e}): {verdict}", ""]
    shape = bench["shape"]
    lines += [f"## 3. {readable(bench['params'])}-parameter model, bf16: ours against transformers", "",
              f"{shape['num_hidden_layers']} layers, hidden {shape['hidden_size']}, intermediate "
              f"{shape['intermediate_size']}, {shape['num_attention_heads']} heads / {shape['num_key_value_heads']} "
              f"kv heads, vocab {shape['vocab_size']}; batch {bench['micro_batch_size']} x {bench['seq_len']}; AdamW; "
              f"transformers' attention: {bench['attention']}. {readable(bench['flops_per_token'])} FLOPs per token "
              f"(6N + 12Lhs); peak {bench['peak_tflops']:.3g} TFLOPs ({bench['peak_source']}).", "",
              "| model | tokens/s | MFU | step memory GB |", "| --- | --- | --- | --- |"]
    for model_name, row in bench["rows"].items():
        memory = f"{row['step_memory_gb']:.2f}" if row["step_memory_gb"] is not None else "-"
        lines.append(f"| {model_name} | {row['tokens_per_second']:.0f} | {row['mfu']:.1%} | {memory} |")
    lines += ["", f"ours / transformers: **{bench['ratio']:.3f}x** (goal >= 1.0x); our MFU "
              f"**{bench['rows']['ours']['mfu']:.1%}** (goal on an H100: >= 40%). Step memory: the most allocated "
              "during a training step above what was allocated before it: both models' weights and optimizer "
              "states, which stay resident throughout.", ""]
    return "\n".join(lines)


def main():
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("error: no CUDA device is available (--device cpu checks the tool itself)")
    unknown = [n for n in [*args.steps, args.model_step] if n not in STEP_FOLDERS]
    if unknown:
        sys.exit(f"error: no step folder for {unknown}; there are {sorted(STEP_FOLDERS)}")

    steps = []
    with tempfile.TemporaryDirectory() as workdir:
        for number in args.steps:
            steps.append(run_step(number, args, Path(workdir)))
            row = steps[-1]
            print(f"{row['step']}: {'ok' if row['ok'] else 'FAILED'} in {row['seconds']:.0f}s", flush=True)
    model_module, utils = import_step(args.model_step)
    logits_diff = check_logits(model_module, utils, device)
    print(f"fp32 logits {device.type} vs cpu: max abs difference {logits_diff:.2e}", flush=True)
    bench = benchmark(model_module, utils, args, device)
    text = report(device, steps, logits_diff, bench, utils.to_readable_format)
    print(text)
    if args.report:
        args.report.parent.mkdir(parents=True, exist_ok=True)
        args.report.write_text(text)
    if not all(row["ok"] for row in steps) or logits_diff > LOGITS_TOLERANCE:
        sys.exit(1)


if __name__ == "__main__":
    main()
