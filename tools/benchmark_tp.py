"""Tensor parallelism in numbers, in one run: training throughput at tp = 1, 2, 4, and how many
all-reduces a decoder layer costs. Prints a table; it never asserts.

1. Throughput: step4_tensor_parallel/train.py under torchrun at each tp size (--metrics_file), on a model
   where matmuls dominate: the embedded tiny Llama (its tokenizer and vocabulary) widened to hidden 1024 /
   intermediate 4096, few layers, short sequences. Tokens/s over the steps after warm-up; the tp sizes
   take turns for --rounds rounds and each keeps its best, so a burst of load elsewhere hurts less.
2. Communication: a small torchrun'd run of this file (--count_worker) watches the calls of
   torch.distributed.all_reduce and all_gather (tools/lib/watch.py), runs one forward and one backward through
   sharded models of 1 and 2 layers, and reports what one more layer adds (expected: 2 all-reduces forward,
   2 backward) and what the embedding and LM head add.

    python tools/benchmark_tp.py
    python tools/benchmark_tp.py --hidden_size 2048 --intermediate_size 8192 --steps 4 --tp_sizes 1 2
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

from lib.steps import ROOT, use_step
from lib.watch import watch

STEP_DIR = ROOT / "step4_tensor_parallel"


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp_sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--hidden_size", type=int, default=1024)
    parser.add_argument("--intermediate_size", type=int, default=4096)
    parser.add_argument("--num_hidden_layers", type=int, default=2)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--micro_batch_size", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the average")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per run")
    parser.add_argument("--rounds", type=int, default=2, help="runs per tp size, taking turns; the best counts")
    parser.add_argument("--count_tp_size", type=int, default=2, help="tp size of the all-reduce counting run")
    parser.add_argument("--count_worker", metavar="OUT", help=argparse.SUPPRESS)  # set by the counting run itself
    return parser.parse_args()


def torchrun(nproc, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               *[str(a) for a in args]]
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(command)}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")


def wide_model_dir(folder, args):
    """The embedded tiny Llama's tokenizer with a wider config."""
    model_dir = Path(folder) / "wide_llama"
    shutil.copytree(ROOT / "assets" / "tiny_llama", model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config.update(hidden_size=args.hidden_size, intermediate_size=args.intermediate_size)
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    return model_dir


def measure_throughput(args, folder):
    """{tp_size: (tokens/s, tokens/s per device, peak memory GB of the logging rank)}, best round of each"""
    model_dir = wide_model_dir(folder, args)
    tokens_per_step = args.micro_batch_size * args.seq_len
    results = {}
    for tp_size in [tp_size for _ in range(args.rounds) for tp_size in args.tp_sizes]:
        metrics_path = Path(folder) / f"tp{tp_size}.jsonl"
        torchrun(tp_size, STEP_DIR / "train.py", "--model_name", model_dir, "--num_hidden_layers",
                 args.num_hidden_layers, "--seq_len", args.seq_len, "--micro_batch_size", args.micro_batch_size,
                 "--gradient_accumulation_steps", 1, "--max_tokens", (args.warmup + args.steps) * tokens_per_step,
                 "--tp_size", tp_size, "--metrics_file", metrics_path)
        timed = [json.loads(line) for line in metrics_path.read_text().splitlines()][args.warmup:]
        seconds = sum(tokens_per_step / m["tokens_per_second"] for m in timed)
        tokens_per_second = len(timed) * tokens_per_step / seconds
        result = (tokens_per_second, tokens_per_second / tp_size, max(m["memory_gb"] for m in timed))
        results[tp_size] = max(results.get(tp_size, result), result)
    return results


def count_collectives(args, folder):
    out_path = Path(folder) / "counts.json"
    torchrun(args.count_tp_size, __file__, "--count_worker", out_path)
    return json.loads(out_path.read_text())


def count_worker(out_path):
    """Under torchrun: count the collectives of one forward and one backward of sharded 1- and 2-layer models."""
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    use_step(STEP_DIR.name)
    import process_group_manager as pgm
    from model import Llama
    from tensor_parallel import apply_tensor_parallel

    dist.init_process_group("gloo")
    pgm.setup_process_group_manager(dist.get_world_size(), 1, 1)
    counts, phase = Counter(), ["forward"]

    def counting(name):
        def count(arguments):
            counts[(phase[0], name)] += 1
        return count

    calls = {dist.all_reduce: counting("all_reduce"), dist.all_gather: counting("all_gather")}

    per_model = {}
    for num_layers in (1, 2):
        config = SimpleNamespace(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers,
                                 num_attention_heads=8, num_key_value_heads=4, rms_norm_eps=1e-5)
        torch.manual_seed(0)
        model = apply_tensor_parallel(Llama(config))
        input_ids = torch.randint(0, config.vocab_size, (2, 16))
        counts.clear()
        phase[0] = "forward"
        with watch(calls=calls):
            logits = model(input_ids)  # [batch, seq, vocab]
            phase[0] = "backward"
            F.cross_entropy(logits.flatten(0, 1), input_ids.flatten()).backward()
        per_model[num_layers] = {f"{p}_{name}": n for (p, name), n in counts.items()}
    if dist.get_rank() == 0:
        keys = sorted(set(per_model[1]) | set(per_model[2]))
        layer = {k: per_model[2].get(k, 0) - per_model[1].get(k, 0) for k in keys}
        rest = {k: per_model[1].get(k, 0) - layer[k] for k in keys}
        Path(out_path).write_text(json.dumps({"per_layer": layer, "embedding_and_lm_head": rest}))
    dist.destroy_process_group()


def main():
    args = parse_args()
    if args.count_worker:
        return count_worker(args.count_worker)
    with tempfile.TemporaryDirectory() as folder:
        throughput = measure_throughput(args, folder)
        counts = count_collectives(args, folder)

    print(f"model: hidden {args.hidden_size}, intermediate {args.intermediate_size}, {args.num_hidden_layers} layers, "
          f"vocab of assets/tiny_llama | batch {args.micro_batch_size} x {args.seq_len} tokens | "
          f"best of {args.rounds} runs of {args.steps} timed steps after {args.warmup} warm-up | 1 thread per rank, "
          f"{os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[1]:.1f} over the last 5 minutes (other processes skew the ratios)")
    print(f"{'tp':>3} | {'tokens/s':>9} | {'tokens/s/device':>15} | {'speed-up':>8} | {'peak memory GB':>14}")
    base = throughput[min(throughput)][0]
    for tp_size, (tokens_per_second, per_device, memory_gb) in throughput.items():
        print(f"{tp_size:>3} | {tokens_per_second:>9.1f} | {per_device:>15.1f} | {tokens_per_second / base:>8.2f} "
              f"| {memory_gb:>14.2f}")
    print(f"\ncollectives in one forward + backward at tp = {args.count_tp_size}:")
    print(f"{'':<22} | {'fwd all-reduce':>14} | {'bwd all-reduce':>14} | {'fwd all-gather':>14}")
    for label, key in (("per decoder layer", "per_layer"), ("embedding + LM head", "embedding_and_lm_head")):
        row = counts[key]
        print(f"{label:<22} | {row.get('forward_all_reduce', 0):>14} | {row.get('backward_all_reduce', 0):>14} "
              f"| {row.get('forward_all_gather', 0):>14}")


if __name__ == "__main__":
    main()
