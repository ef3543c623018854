"""Step 12's ZeRO-3 beside PyTorch's FSDP2 (torch.distributed.fsdp.fully_shard), in the same run: the same Llama,
weights and batches, 2 ranks of gloo on the CPU, fp32, each decoder layer a unit and the rest at the root.

    ours    ZeroDataParallel(model, zero_stage=3) + ZeroAdamW (step12_fsdp/zero.py): units are the embedding,
            each decoder layer, the final norm with the LM head
    FSDP2   fully_shard(layer) for every decoder layer, then fully_shard(model) (the embedding, final norm and
            LM head in the root's group), torch.optim.AdamW on the sharded parameters (DTensors)

Both gather a layer's parameters before its forward and its backward, reduce-scatter its gradients after,
prefetch the next layer, and step AdamW on each rank's shard: the same algorithm, so the losses must agree
(goal: the largest per-step difference <= 1e-4) and the time per step is a fair comparison (goal: ours no
slower, ratio <= 1.0). The two take turns, one step each, order alternating, with a barrier around every
step; after 1 warm-up step the ratio is the median of the per-step ratios (each pair of steps sees the same load
on a busy machine) with their range, beside the median step time of each and of its AdamW step alone (ours: one
flat tensor per unit; FSDP2: one DTensor per parameter).

    python tools/benchmark_fsdp.py                  # 31.7M parameters (40 layers, hidden 256), ~2 minutes
    python tools/benchmark_fsdp.py --json           # one JSON object: ours_step_s, torch_step_s, max_abs_dloss
                                                    # (and the losses, and the optimizer step's share of each)
"""
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
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from lib.measure import cpu_name, free_port
from lib.models import model_arguments, model_config
from lib.steps import use_step

use_step("step12_fsdp")
import process_group_manager as pgm  # noqa: E402
from model import Llama  # noqa: E402
from optimizer import decay_groups  # noqa: E402
from zero import ZeroDataParallel  # noqa: E402
from zero_optimizer import ZeroAdamW  # noqa: E402

DP_SIZE = 2


def parse_args():
    parser = model_arguments(__doc__)
    parser.add_argument("--steps", type=int, default=5, help="timed optimizer steps (after 1 warm-up step)")
    parser.add_argument("--learning_rate", type=float, default=1e-3)
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    return parser.parse_args()


def build_ours(config, args):
    torch.manual_seed(0)  # both start from the same weights
    model = ZeroDataParallel(Llama(config), zero_stage=3)
    return model, ZeroAdamW(model, lr=args.learning_rate, weight_decay=0.1)


def build_torch(config, args):
    torch.manual_seed(0)
    model = Llama(config)
    mesh = init_device_mesh("cpu", (DP_SIZE,))
    for layer in model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # the same two groups as ours: the matrices decay, the norm weights do not
    return model, torch.optim.AdamW(decay_groups(model.parameters(), weight_decay=0.1), lr=args.learning_rate)


def train_step(kind, model, optimizer, tokens):
    """tokens: [micro_batch, seq + 1] of this rank. One micro-batch per step; returns the local loss and the
    seconds of the optimizer step alone."""
    model.zero_grad()
    logits = model(input_ids=tokens[:, :-1])  # [batch, seq, vocab]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    loss.backward()
    if kind == "ours":
        model.finish_gradient_synchronization()
    start = time.perf_counter()
    optimizer.step()
    return loss.item(), time.perf_counter() - start


def worker(rank, port, args, result_dir):
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))  # init_device_mesh reads the default group
    dist.init_process_group("gloo", rank=rank, world_size=DP_SIZE)
    pgm.setup_process_group_manager(tp_size=1, cp_size=1, pp_size=1, dp_size=DP_SIZE)
    config = model_config(args)
    built = {"ours": build_ours(config, args), "torch": build_torch(config, args)}
    num_params = sum(p.numel() for p in built["ours"][0].parameters())

    generator = torch.Generator().manual_seed(1)
    # [steps, dp, micro_batch, seq + 1]: the same batches for both
    batches = torch.randint(config.vocab_size, (1 + args.steps, DP_SIZE, args.micro_batch_size, args.seq_len + 1),
                            generator=generator)
    losses = {kind: [] for kind in built}
    seconds = {kind: [] for kind in built}
    optimizer_seconds = {kind: [] for kind in built}
    for step in range(1 + args.steps):  # step 0 warms up
        for kind in (("ours", "torch") if step % 2 == 0 else ("torch", "ours")):
            model, optimizer = built[kind]
            dist.barrier()
            start = time.perf_counter()
            loss, optimizer_step = train_step(kind, model, optimizer, batches[step, rank])
            dist.barrier()
            losses[kind].append(loss)
            if step:
                seconds[kind].append(time.perf_counter() - start)
                optimizer_seconds[kind].append(optimizer_step)
    everyone = [None] * DP_SIZE
    dist.all_gather_object(everyone, {"losses": losses, "seconds": seconds, "optimizer_seconds": optimizer_seconds})
    if rank == 0:
        result = {"num_params": num_params}
        for kind in built:
            # the loss of the global batch (the mean over ranks), the slowest rank's time per step
            result[f"{kind}_losses"] = [statistics.fmean(step) for step in zip(*(r["losses"][kind] for r in everyone))]
            for key, name in (("seconds", "step_s"), ("optimizer_seconds", "optimizer_s")):
                result[f"{kind}_{name}_per_step"] = [max(step) for step in zip(*(r[key][kind] for r in everyone))]
                result[f"{kind}_{name}"] = statistics.median(result[f"{kind}_{name}_per_step"])
        (Path(result_dir) / "result.json").write_text(json.dumps(result))
    # Both ranks done before either tears down: under load a rank that destroyed its process group while the
    # other still used its connections was seen to die with SIGABRT ("terminate called without an active
    # exception", from a gloo thread), a few times in a full test suite and never alone.
    del built
    dist.barrier()
    dist.destroy_process_group()


def main():
    args = parse_args()
    with tempfile.TemporaryDirectory() as result_dir:
        mp.spawn(worker, args=(free_port(), args, result_dir), nprocs=DP_SIZE)
        result = json.loads((Path(result_dir) / "result.json").read_text())
    result["max_abs_dloss"] = max(abs(a - b) for a, b in zip(result["ours_losses"], result["torch_losses"]))
    # The two take turns step by step: the ratio of each pair of steps sees the same load, whatever comes and goes.
    ratios = [ours / theirs for ours, theirs in zip(result["ours_step_s_per_step"], result["torch_step_s_per_step"])]
    result["ours_over_torch"] = statistics.median(ratios)
    result["ours_over_torch_range"] = [min(ratios), max(ratios)]
    if args.json:
        print(json.dumps(result))
        return
    print(f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, gloo, dp {DP_SIZE}, fp32 | "
          f"{result['num_params'] / 1e6:.1f}M parameters: hidden {args.hidden_size}, {args.num_hidden_layers} layers, "
          f"vocab {args.vocab_size} | seq_len {args.seq_len}, micro_batch {args.micro_batch_size} | {args.steps} "
          f"timed steps after 1 warm-up")
    print(f"{'':>6} {'ms/step':>8} {'of it AdamW':>11}  losses (mean over ranks, warm-up first)")
    for kind, name in (("ours", "ours"), ("torch", "FSDP2")):
        print(f"{name:>6} {result[f'{kind}_step_s'] * 1000:>8.0f} {result[f'{kind}_optimizer_s'] * 1000:>11.0f}  "
              f"{' '.join(f'{x:.5f}' for x in result[f'{kind}_losses'])}")
    speed = "ok" if result["ours_over_torch"] <= 1.0 else "MISS"
    losses = "ok" if result["max_abs_dloss"] <= 1e-4 else "MISS"
    print(f"ours / FSDP2 time per step: {result['ours_over_torch']:.3f}, the median of {len(ratios)} paired steps "
          f"(range {result['ours_over_torch_range'][0]:.2f}-{result['ours_over_torch_range'][1]:.2f}; goal <= 1.0: "
          f"{speed}) | largest per-step "
          f"|loss difference|: {result['max_abs_dloss']:.2e} (goal <= 1e-4: {losses})")


if __name__ == "__main__":
    main()
