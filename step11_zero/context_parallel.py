"""Context parallelism: the cp_size ranks of a cp group split every sequence between them, so each rank
holds the activations of seq_len / cp_size tokens and long sequences fit.

Everything in a decoder layer except attention works token by token, so it runs unchanged on a rank's
own tokens. Attention needs every earlier token's key and value: ring attention passes the key/value
blocks around the cp ring while each rank keeps its queries.

The load-balanced (zigzag) split. With causal attention the last tokens attend to the most keys, so a
contiguous split would give the rank holding the end of the sequence the most work. Instead each
sequence is cut into 2 x cp_size chunks and rank r takes chunks r and 2*cp_size - 1 - r, one from the
front and its mirror from the back. With cp_size 2:

    sequence   | c0 | c1 | c2 | c3 |
    cp rank 0    c0             c3
    cp rank 1         c1   c2

Ring attention (one autograd.Function). Forward: cp_size steps; at step s rank r holds the keys and
values of cp rank (r - s) mod cp_size. It posts the exchange of that block to the next rank before it
computes with it, so communication overlaps compute. Each block's partial attention comes with its
log-sum-exp (lse) of the scores, which merges it exactly into the running result (online softmax):

    lse = log(exp(lse_a) + exp(lse_b)),   out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)

Under the zigzag split each block pair needs all of one side, the causal diagonal, or nothing (see
block_plan). Backward goes round the ring again, recomputing each block's probabilities from the saved
lse; the gradient of a key/value block travels with it and, after a full turn, arrives back at the rank
that owns those keys.

VERBOSE=1 prints every ring exchange and which part of each block pair was computed.
"""
import math
import os

import torch
import torch.distributed as dist

import process_group_manager as pgm

VERBOSE = os.environ.get("VERBOSE", "0") == "1"


def log(message):
    if VERBOSE:
        grid = pgm.process_group_manager
        print(f"[rank {grid.global_rank} | cp {grid.cp_rank}/{grid.cp_world_size}] {message}\n", end="", flush=True)


def zigzag_indices(seq_len, cp_size, cp_rank):
    """The sequence positions cp_rank holds: chunks cp_rank and 2*cp_size - 1 - cp_rank of 2*cp_size."""
    chunk = seq_len // (2 * cp_size)
    front = torch.arange(cp_rank * chunk, (cp_rank + 1) * chunk)
    back = torch.arange((2 * cp_size - 1 - cp_rank) * chunk, (2 * cp_size - cp_rank) * chunk)
    return torch.cat([front, back])  # [seq_len / cp_size]


def split_batch_for_context_parallel(batch):
    """This cp rank's tokens of every sequence in the batch: inputs, targets and their true positions
    (rotary embeddings need the positions the tokens have in the whole sequence)."""
    grid = pgm.process_group_manager
    if grid.cp_world_size == 1:
        return batch
    seq_len = batch["input_ids"].shape[1]
    index = zigzag_indices(seq_len, grid.cp_world_size, grid.cp_rank)
    return {name: tensor[:, index] for name, tensor in batch.items()}  # [batch, seq / cp] each


def block_plan(cp_rank, kv_rank, local_len):
    """Which of this rank's queries attend to which of kv_rank's keys, under the zigzag split:
    (query slice, key slice, causal). Rank r holds chunks (r, 2cp-1-r) in that order, as does kv_rank.
    - its own block: chunk r sees chunk r causally and not its later chunk 2cp-1-r; chunk 2cp-1-r sees
      chunk r fully and itself causally: ordinary causal attention over the local tokens;
    - an earlier rank (kv_rank < r): its front chunk precedes both of ours (all queries see it fully), its
      back chunk follows both (nothing);
    - a later rank (kv_rank > r): both its chunks lie after our front chunk (nothing) and before our
      back chunk (the back half of the queries sees all of it)."""
    half = local_len // 2
    if kv_rank == cp_rank:
        return slice(0, local_len), slice(0, local_len), True
    if kv_rank < cp_rank:
        return slice(0, local_len), slice(0, half), False
    return slice(half, local_len), slice(0, local_len), False


def describe(query_rows, key_cols, causal, local_len):
    def part(s):
        return "all" if (s.start, s.stop) == (0, local_len) else ("front half" if s.start == 0 else "back half")
    return f"queries [{part(query_rows)}] x keys [{part(key_cols)}] {'causal diagonal' if causal else 'full'}" + (
        "" if key_cols.stop == local_len else ", keys [back half] skipped") + (
        "" if query_rows.start == 0 else ", queries [front half] skipped")


class RingExchange:
    """One hop around the cp ring: send `tensor` to the next cp rank and receive the previous rank's tensor
    of the same shape. Posting returns at once; wait() returns the received tensor. Key/value blocks and
    their gradients can be in flight at the same time between the same two ranks: distinct tags keep
    them apart."""

    TAGS = {"kv": 1, "dkv": 2}

    def __init__(self, tensor, what):
        grid = pgm.process_group_manager
        log(f"ring exchange: send {what} {tuple(tensor.shape)} -> rank {grid.cp_send_rank}, "
            f"recv <- rank {grid.cp_recv_rank}")
        self.received = torch.empty_like(tensor)
        self.requests = dist.batch_isend_irecv([
            dist.P2POp(dist.isend, tensor.contiguous(), grid.cp_send_rank, group=grid.cp_group, tag=self.TAGS[what]),
            dist.P2POp(dist.irecv, self.received, grid.cp_recv_rank, group=grid.cp_group, tag=self.TAGS[what])])

    def wait(self):
        for request in self.requests:
            request.wait()
        return self.received


def block_scores(q, k, causal, scale):
    """Attention scores of one block pair in fp32: [batch, kv_heads, group, q_len, k_len]."""
    scores = (q @ k.transpose(-1, -2)) * scale
    if causal:  # the own block: key j is visible to query i when j <= i
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    return scores


def block_forward(q, k, v, causal, scale):
    """Attention of queries q over one key/value block, and the log-sum-exp of each query's scores."""
    scores = block_scores(q, k, causal, scale)
    lse = torch.logsumexp(scores, dim=-1)  # [batch, kv_heads, group, q_len]
    return torch.exp(scores - lse.unsqueeze(-1)) @ v, lse  # [batch, kv_heads, group, q_len, head_dim]


def block_backward(q, k, v, grad_out, lse, delta, causal, scale):
    """Gradients of one block pair, given the final lse and delta = rowsum(grad_out * out) of each query.
    The probabilities are recomputed rather than saved: that is what keeps the saved activations small."""
    probs = torch.exp(block_scores(q, k, causal, scale) - lse.unsqueeze(-1))  # [batch, kv_heads, group, q_len, k_len]
    grad_v = (probs.transpose(-1, -2) @ grad_out).sum(dim=2, keepdim=True)  # summed over the query heads of a group
    grad_scores = probs * (grad_out @ v.transpose(-1, -2) - delta.unsqueeze(-1))  # softmax backward
    grad_q = grad_scores @ k * scale
    grad_k = (grad_scores.transpose(-1, -2) @ q).sum(dim=2, keepdim=True) * scale
    return grad_q, grad_k, grad_v


def group_queries(q, num_kv_heads):
    """[batch, heads, seq, head_dim] -> [batch, kv_heads, group, seq, head_dim]: query head h uses kv head
    h // group (grouped-query attention), so k and v broadcast over the group without being copied."""
    batch, heads, seq, head_dim = q.shape
    return q.reshape(batch, num_kv_heads, heads // num_kv_heads, seq, head_dim)


class RingAttention(torch.autograd.Function):
    """Causal attention of this rank's queries over the keys and values of the whole sequence.
    q: [batch, heads, seq / cp, head_dim]; k, v: [batch, kv_heads, seq / cp, head_dim], zigzag-split."""

    @staticmethod
    def forward(ctx, q, k, v):
        grid = pgm.process_group_manager
        cp_size, cp_rank, local_len = grid.cp_world_size, grid.cp_rank, q.shape[2]
        scale = 1.0 / math.sqrt(q.shape[-1])
        q32 = group_queries(q, k.shape[1]).float()
        kv = torch.stack([k, v])  # [2, batch, kv_heads, seq / cp, head_dim]: one message per hop

        out = lse = None
        for step in range(cp_size):
            kv_rank = (cp_rank - step) % cp_size
            if step + 1 < cp_size:
                exchange = RingExchange(kv, "kv")  # posted first: the next block travels while this one is computed
            rows, cols, causal = block_plan(cp_rank, kv_rank, local_len)
            log(f"forward step {step + 1}/{cp_size}, kv of cp rank {kv_rank}: {describe(rows, cols, causal, local_len)}")
            k32, v32 = kv[0, :, :, None, cols].float(), kv[1, :, :, None, cols].float()  # [batch, kv_heads, 1, k_len, head_dim]
            block_out, block_lse = block_forward(q32[..., rows, :], k32, v32, causal, scale)
            if out is None:  # step 0, the own block, covers every query
                out, lse = block_out, block_lse
            else:  # merge by log-sum-exp: both parts end up weighted by exp(their lse - the merged lse)
                merged_lse = torch.logaddexp(lse[..., rows], block_lse)
                out[..., rows, :] = (out[..., rows, :] * torch.exp(lse[..., rows] - merged_lse).unsqueeze(-1)
                                     + block_out * torch.exp(block_lse - merged_lse).unsqueeze(-1))
                lse[..., rows] = merged_lse
            if step + 1 < cp_size:
                kv = exchange.wait()

        ctx.save_for_backward(q, k, v, out, lse)
        return out.reshape(q.shape).to(q.dtype, copy=True)  # [batch, heads, seq / cp, head_dim]

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        grid = pgm.process_group_manager
        cp_size, cp_rank, local_len = grid.cp_world_size, grid.cp_rank, q.shape[2]
        scale = 1.0 / math.sqrt(q.shape[-1])
        q32 = group_queries(q, k.shape[1]).float()
        grad_out = group_queries(grad_out, k.shape[1]).float()
        delta = (grad_out * out).sum(dim=-1)  # [batch, kv_heads, group, q_len]
        grad_q = torch.zeros(q32.shape, dtype=torch.float32, device=q.device)

        kv, grad_kv_exchange = torch.stack([k, v]), None
        for step in range(cp_size):
            kv_rank = (cp_rank - step) % cp_size
            if step + 1 < cp_size:
                kv_exchange = RingExchange(kv, "kv")
            rows, cols, causal = block_plan(cp_rank, kv_rank, local_len)
            log(f"backward step {step + 1}/{cp_size}, kv of cp rank {kv_rank}: {describe(rows, cols, causal, local_len)}")
            k32, v32 = kv[0, :, :, None, cols].float(), kv[1, :, :, None, cols].float()
            block_grad_q, block_grad_k, block_grad_v = block_backward(q32[..., rows, :], k32, v32, grad_out[..., rows, :],
                                                                      lse[..., rows], delta[..., rows], causal, scale)
            grad_q[..., rows, :] += block_grad_q
            # The gradient of kv_rank's keys and values: this rank's share, plus what the ranks that held
            # this block before it have accumulated (it arrives from the previous rank).
            grad_kv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
            grad_kv[0, :, :, cols] = block_grad_k.squeeze(2)
            grad_kv[1, :, :, cols] = block_grad_v.squeeze(2)
            if grad_kv_exchange is not None:
                grad_kv += grad_kv_exchange.wait()
            # Hand it on with the block: the next rank holds these keys at the next step.
            grad_kv_exchange = RingExchange(grad_kv, "dkv")
            if step + 1 < cp_size:
                kv = kv_exchange.wait()

        # After a full turn the gradient of this rank's own keys and values has come back.
        grad_kv = grad_kv_exchange.wait()
        return grad_q.reshape(q.shape).to(q.dtype), grad_kv[0].to(k.dtype), grad_kv[1].to(v.dtype)


def ring_attention(q, k, v):
    return RingAttention.apply(q, k, v)


def apply_context_parallel(model):
    """Switch every attention layer of a full Llama to ring attention over the cp group; returns it."""
    for layer in model.layers:
        layer.self_attn.context_parallel = True
    return model
