"""Ring attention (step9) against full causal attention, run by tests/test_context_parallel.py as

    python -m torch.distributed.run --standalone --nproc_per_node 4 tests/cp_attention_check.py OUT.json

Every rank draws the same full q, k, v (grouped-query: 8 query heads, 2 kv heads) and output gradient,
computes causal scaled_dot_product_attention on the whole sequence, then keeps its zigzag share of the
tokens and runs ring attention over its cp group: once with cp 4 (all ranks) and once with cp 2 (two
rings of 2). Each rank compares its output and q/k/v gradients with the matching rows of the full ones
and counts the (query, key) score pairs ring attention actually computed (block_forward is wrapped).
Rank 0 writes, per cp size, the largest |difference| over all ranks and every rank's pair count.
"""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import import_step  # noqa: E402

pgm, cp = import_step("step9", "process_group_manager", "context_parallel")

BATCH, HEADS, KV_HEADS, SEQ, HEAD_DIM = 2, 8, 2, 24, 16  # SEQ divides by 2 x cp for cp 2 and 4

computed_pairs = 0
block_forward = cp.block_forward


def counting_block_forward(q, k, v, causal, scale):
    global computed_pairs
    q_len, k_len = q.shape[-2], k.shape[-2]
    computed_pairs += q_len * (q_len + 1) // 2 if causal else q_len * k_len  # per (batch, head)
    return block_forward(q, k, v, causal, scale)


def check(cp_size):
    global computed_pairs
    world_size = dist.get_world_size()
    pgm.setup_process_group_manager(1, cp_size, 1, world_size // cp_size)  # tp, cp, pp, dp
    grid = pgm.process_group_manager

    generator = torch.Generator().manual_seed(cp_size)
    q, grad_out = (torch.randn(BATCH, HEADS, SEQ, HEAD_DIM, generator=generator) for _ in range(2))
    k, v = (torch.randn(BATCH, KV_HEADS, SEQ, HEAD_DIM, generator=generator) for _ in range(2))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    reference = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # [batch, heads, seq, head_dim]
    reference.backward(grad_out)

    index = cp.zigzag_indices(SEQ, cp_size, grid.cp_rank)
    local = [t.detach()[:, :, index].clone().requires_grad_() for t in (q, k, v)]
    computed_pairs = 0
    out = cp.ring_attention(*local)  # [batch, heads, seq / cp, head_dim]
    pairs = computed_pairs
    out.backward(grad_out[:, :, index])

    differences = {
        "output": (out - reference.detach()[:, :, index]).abs().max().item(),
        **{f"grad_{name}": (mine.grad - full.grad[:, :, index]).abs().max().item()
           for name, mine, full in zip("qkv", local, (q, k, v))},
    }
    per_rank = [None] * world_size
    dist.all_gather_object(per_rank, {"differences": differences, "pairs": pairs, "cp_rank": grid.cp_rank,
                                      "positions": index.tolist()})
    return {
        "max_differences": {name: max(r["differences"][name] for r in per_rank) for name in differences},
        "ranks": per_rank,
    }


def main():
    dist.init_process_group(backend="gloo")
    cp.block_forward = counting_block_forward
    results = {cp_size: check(cp_size) for cp_size in (4, 2)}
    if dist.get_rank() == 0:
        Path(sys.argv[1]).write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
