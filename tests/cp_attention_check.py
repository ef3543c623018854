"""Ring attention (step9) against full causal attention, and its fused kernels against the fp32 reference,
run by tests/test_context_parallel.py as

    python -m torch.distributed.run --standalone --nproc_per_node 4 tests/cp_attention_check.py OUT.json

Every rank draws the same full q, k, v (grouped-query: 8 query heads, 2 kv heads) and output gradient,
computes causal scaled_dot_product_attention on the whole sequence in fp32, then keeps its zigzag share
of the tokens and runs ring attention over a ring of cp consecutive ranks: cp 2 (two rings), cp 3 (rank 3
sits out) and cp 4, in fp32 and bf16, once with the fused kernels (attention_block_forward /
attention_block_backward) and once with the fp32 reference spelling (reference_block_forward /
reference_block_backward) swapped in. Each rank compares outputs and q/k/v gradients and counts the
(query, key) score pairs the ring computed. Rank 0 writes, per cp size and dtype, the largest |difference|
over the ranks, the largest |value| of each full result, and every rank's pair count. (cp 1 is a single
causal block: tests/test_context_parallel.py checks the block functions in-process.)
"""
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import import_step  # noqa: E402

pgm, cp = import_step("step9", "process_group_manager", "context_parallel")

BATCH, HEADS, KV_HEADS, SEQ, HEAD_DIM = 2, 8, 2, 24, 16  # SEQ divides by 2 x cp for cp 2, 3 and 4
KERNELS = {"fused": (cp.attention_block_forward, cp.attention_block_backward),
           "reference": (cp.reference_block_forward, cp.reference_block_backward)}
NAMES = ["output", "grad_q", "grad_k", "grad_v"]
computed_pairs = 0


def counting(block_forward):
    def counted(q, k, v, causal):
        global computed_pairs
        q_len, k_len = q.shape[-2], k.shape[-2]
        computed_pairs += q_len * (q_len + 1) // 2 if causal else q_len * k_len  # per (batch, head)
        return block_forward(q, k, v, causal)
    return counted


def ring(kernels, q, k, v, grad_out, index):
    """This rank's output and q/k/v gradients (fp32) from ring attention with the given block kernels."""
    global computed_pairs
    cp.attention_block_forward, cp.attention_block_backward = counting(kernels[0]), kernels[1]
    local = [t.detach()[:, :, index].clone().requires_grad_() for t in (q, k, v)]
    computed_pairs = 0
    out = cp.ring_attention(*local)  # [batch, heads, seq / cp, head_dim]
    out.backward(grad_out[:, :, index])
    return [t.float() for t in (out.detach(), *(t.grad for t in local))], computed_pairs


def ring_grid(cp_size):
    """The fields of the process grid that ring attention reads, for rings of cp_size consecutive ranks
    (ranks left over sit out: None)."""
    rank, world_size = dist.get_rank(), dist.get_world_size()
    rings = [list(range(start, start + cp_size)) for start in range(0, world_size - cp_size + 1, cp_size)]
    groups = [dist.new_group(ring) for ring in rings]  # every rank creates every group, in the same order
    for ring, group in zip(rings, groups):
        if rank in ring:
            cp_rank = ring.index(rank)
            return SimpleNamespace(global_rank=rank, cp_rank=cp_rank, cp_world_size=cp_size, cp_group=group,
                                   cp_send_rank=ring[(cp_rank + 1) % cp_size],
                                   cp_recv_rank=ring[(cp_rank - 1) % cp_size])
    return None


def check(cp_size, dtype):
    """This rank's largest differences and pair count, or None when it sits out."""
    grid = pgm.process_group_manager = ring_grid(cp_size)
    if grid is None:
        return None
    generator = torch.Generator().manual_seed(cp_size)
    q, grad_out = (torch.randn(BATCH, HEADS, SEQ, HEAD_DIM, generator=generator).to(dtype) for _ in range(2))
    k, v = (torch.randn(BATCH, KV_HEADS, SEQ, HEAD_DIM, generator=generator).to(dtype) for _ in range(2))
    full = [t.float().clone().requires_grad_() for t in (q, k, v)]
    expected = F.scaled_dot_product_attention(*full, is_causal=True, enable_gqa=True)  # [batch, heads, seq, head_dim]
    expected.backward(grad_out.float())

    index = cp.zigzag_indices(SEQ, cp_size, grid.cp_rank)
    expected = [expected.detach()[:, :, index], *(t.grad[:, :, index] for t in full)]
    fused, pairs = ring(KERNELS["fused"], q, k, v, grad_out, index)
    reference, _ = ring(KERNELS["reference"], q, k, v, grad_out, index)

    def largest_difference(results, against):
        return {name: (a - b).abs().max().item() for name, a, b in zip(NAMES, results, against)}

    return {"fused_vs_full": largest_difference(fused, expected),
            "fused_vs_reference": largest_difference(fused, reference),
            "reference_vs_full": largest_difference(reference, expected),
            "largest_value": {name: t.abs().max().item() for name, t in zip(NAMES, expected)},
            "pairs": pairs, "cp_rank": grid.cp_rank, "positions": index.tolist()}


def gather(cp_size, dtype):
    """Over the ranks that took part: the largest of each difference, and every rank's pair count."""
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, check(cp_size, dtype))
    per_rank = [result for result in per_rank if result is not None]
    kinds = ("fused_vs_full", "fused_vs_reference", "reference_vs_full", "largest_value")
    return {**{kind: {name: max(r[kind][name] for r in per_rank) for name in NAMES} for kind in kinds},
            "ranks": [{key: r[key] for key in ("pairs", "cp_rank", "positions")} for r in per_rank]}


def main():
    dist.init_process_group(backend="gloo")
    results = {cp_size: {str(dtype).removeprefix("torch."): gather(cp_size, dtype)
                         for dtype in (torch.float32, torch.bfloat16)} for cp_size in (2, 3, 4)}
    if dist.get_rank() == 0:
        Path(sys.argv[1]).write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
