"""Checks one data-parallel step folder from inside a 2-process run; writes what it measured as JSON.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dp_check.py step6 out.json

Two optimizer steps (grad_acc 2, then 3) of dp_size 2 x micro_batch_size 1 on random tokens, against
an unwrapped copy of the model that every rank runs on the whole global batch (micro_batch_size 2,
same grad_acc) from the same parameters. Per step it records: the all-reduce calls made during each
micro-batch's backward and during the synchronisation, how far the synchronised gradients are from
the global-batch gradient (and, for contrast, how far the "reduce only the last micro-batch" trap
would be), and whether the parameters after the optimizer step are bitwise identical on every rank.
tests/test_data_parallel.py asserts on the JSON.
"""
import argparse
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
MICRO_BATCH, SEQ = 1, 32


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument("step", help="step5 or step6")
    parser.add_argument("out", help="JSON file written by rank 0")
    parser.add_argument("--bucket_size_mb", type=float, default=1)
    return parser.parse_args()


def micro_batch_loss(model, tokens, grad_acc):
    """tokens [batch, seq + 1] -> mean next-token loss, scaled for gradient accumulation."""
    logits = model(input_ids=tokens[:, :-1])  # [batch, seq, vocab]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)) / grad_acc


def gradients(model):
    return [p.grad.clone() for p in model.parameters()]


def max_diff(grads_a, grads_b):
    return max((a - b).abs().max().item() for a, b in zip(grads_a, grads_b))


def main():
    args = parse_args()
    step_dir = next(ROOT.glob(f"{args.step}_*"))
    sys.path.insert(0, str(step_dir))
    import data_parallel
    import process_group_manager as pgm
    from model import Llama

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    pgm.setup_process_group_manager(tp_size=1, pp_size=1, dp_size=2)
    rank, dp_size = pgm.process_group_manager.dp_rank, pgm.process_group_manager.dp_world_size
    config = SimpleNamespace(**json.loads((ROOT / "assets" / "tiny_llama" / "config.json").read_text()))

    torch.manual_seed(0)
    reference = Llama(config)
    torch.manual_seed(0)
    model = Llama(config)
    if args.step == "step5":
        model = data_parallel.DataParallelNaive(model)
    else:
        model = data_parallel.DataParallelBucket(model, args.bucket_size_mb)
    params = list(model.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3)

    all_reduce_calls = [0]
    real_all_reduce = dist.all_reduce

    def counting_all_reduce(*a, **kw):
        all_reduce_calls[0] += 1
        return real_all_reduce(*a, **kw)

    dist.all_reduce = counting_all_reduce

    result = {"num_params": len(params), "steps": []}
    if args.step == "step6":
        bucket_params = [p for bucket in model.buckets for p in bucket.params]
        result.update(
            num_buckets=len(model.buckets),
            bucket_numels=[bucket.grad_buffer.numel() for bucket in model.buckets],
            bucket_param_counts=[len(bucket.params) for bucket in model.buckets],
            # every parameter in exactly one bucket: same multiset of identities
            every_param_once=sorted(map(id, bucket_params)) == sorted(map(id, params)),
            first_bucket_holds_lm_head=model.buckets[0].params[0] is model.module.lm_head.weight,
            max_bucket_numel=int(args.bucket_size_mb * 2**20) // 4,
            largest_param_numel=max(p.numel() for p in params),
        )

    generator = torch.Generator().manual_seed(1234)
    for grad_acc in (2, 3):
        # The same global batch on every rank: [grad_acc, dp, micro_batch, seq + 1]
        tokens = torch.randint(config.vocab_size, (grad_acc, dp_size, MICRO_BATCH, SEQ + 1), generator=generator)

        # The unwrapped model, from the same parameters, on the whole global batch: micro-batches of
        # dp x micro_batch samples.
        with torch.no_grad():
            for p_ref, p in zip(reference.parameters(), params):
                p_ref.copy_(p)
        reference.zero_grad()
        for i in range(grad_acc):
            micro_batch_loss(reference, tokens[i].reshape(dp_size * MICRO_BATCH, SEQ + 1), grad_acc).backward()
        reference_grads = gradients(reference)

        # The trap, for contrast: earlier micro-batches stay local, only the last one is averaged.
        per_sample = []
        for i in range(grad_acc):
            per_sample.append([])
            for r in range(dp_size):
                reference.zero_grad()
                micro_batch_loss(reference, tokens[i, r], grad_acc).backward()
                per_sample[i].append(gradients(reference))
        trap_grads = [sum(per_sample[i][rank][k] for i in range(grad_acc - 1))
                      + sum(per_sample[-1][r][k] for r in range(dp_size)) / dp_size
                      for k in range(len(params))]

        # The data-parallel model on this rank's share.
        model.zero_grad()  # step 6's also empties the buckets
        calls = []
        for i in range(grad_acc):
            model.require_backward_grad_sync = i == grad_acc - 1
            all_reduce_calls[0] = 0
            micro_batch_loss(model, tokens[i, rank], grad_acc).backward()
            calls.append(all_reduce_calls[0])
        all_reduce_calls[0] = 0
        if args.step == "step6":
            model.finish_gradient_synchronization()
        calls.append(all_reduce_calls[0])
        dp_grads = gradients(model)

        before = torch.cat([p.detach().flatten() for p in params])
        optimizer.step()
        after = torch.cat([p.detach().flatten() for p in params])
        gathered = [torch.empty_like(after) for _ in range(dp_size)]
        dist.all_gather(gathered, after, group=pgm.process_group_manager.dp_group)

        result["steps"].append({
            "grad_acc": grad_acc,
            "all_reduce_calls": calls,  # per micro-batch backward, then the synchronisation
            "grad_max_abs": max(g.abs().max().item() for g in reference_grads),
            "grad_diff": max_diff(dp_grads, reference_grads),
            "trap_grad_diff": max_diff(trap_grads, reference_grads),
            "params_identical_across_ranks": all(torch.equal(gathered[0], other) for other in gathered[1:]),
            "params_changed": not torch.equal(before, after),
        })

    dist.all_reduce = real_all_reduce
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, result)
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(per_rank, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
