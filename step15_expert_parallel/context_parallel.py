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
computes with it, so communication overlaps compute. Each block pair is one call of PyTorch's fused
attention kernel (flash attention on a CPU, flash or memory-efficient on CUDA), which also returns the
log-sum-exp (lse) of each query's scores; the lse merges the block exactly into the running result
(online softmax), kept in fp32:

    lse = log(exp(lse_a) + exp(lse_b)),   out = out_a * exp(lse_a - lse) + out_b * exp(lse_b - lse)

Under the zigzag split each block pair needs all of one side, the causal diagonal, or nothing (see
block_plan). Backward goes round the ring again and calls the kernel's backward per block pair with the
final merged out and lse, so that it recomputes each block's probabilities against the whole row's
normaliser; the gradient of a key/value block travels with it and, after a full turn, arrives back at
the rank that owns those keys. reference_block_forward / reference_block_backward spell the kernels out
in fp32, for reading and for the tests.

VERBOSE=1 prints every ring exchange and which part of each block pair was computed.
"""
import math
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

import process_group_manager as pgm


def log(message):
    if os.environ.get("VERBOSE", "0") == "1":  # read at every call: nothing is read at import
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


def describe(query_slice, key_slice, causal, local_len):
    def part(s):
        return "all" if (s.start, s.stop) == (0, local_len) else ("front half" if s.start == 0 else "back half")
    return f"queries [{part(query_slice)}] x keys [{part(key_slice)}] {'causal diagonal' if causal else 'full'}" + (
        "" if key_slice.stop == local_len else ", keys [back half] skipped") + (
        "" if query_slice.start == 0 else ", queries [front half] skipped")


class RingExchange:
    """One hop around the cp ring: send `tensor` to the next cp rank and receive the previous rank's tensor
    of the same shape. Posting returns at once; wait() returns the received tensor.

    Key/value blocks and their gradients can be in flight at the same time between the same two ranks.
    No tag keeps them apart (NCCL ignores tags): messages between two ranks are matched in the order they
    were posted, and every rank posts its exchanges in the same order (kv, then dkv, step after step)."""

    def __init__(self, tensor, what):
        grid = pgm.process_group_manager
        log(f"ring exchange: send {what} {tuple(tensor.shape)} -> rank {grid.cp_send_rank}, "
            f"recv <- rank {grid.cp_recv_rank}")
        self.received = torch.empty_like(tensor)
        self.requests = dist.batch_isend_irecv([
            dist.P2POp(dist.isend, tensor.contiguous(), grid.cp_send_rank, group=grid.cp_group),
            dist.P2POp(dist.irecv, self.received, grid.cp_recv_rank, group=grid.cp_group)])

    def wait(self):
        for request in self.requests:
            request.wait()
        return self.received


# The fused kernels: q, k, v, out, grad_out [batch, heads, seq, head_dim]; lse [batch, heads, q_len], fp32,
# natural log. Their backward recomputes the probabilities as exp(scores - lse) and takes
# delta = rowsum(grad_out * out) from `out`: given the final merged lse and output, a block's backward
# yields that block's share of the true gradients (the ring-flash-attention trick).

def use_cuda_flash(q):
    """The CUDA flash kernel takes fp16/bf16 and head_dim a multiple of 8 up to 256; otherwise the
    memory-efficient kernel, which takes fp32 too."""
    return q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] % 8 == 0 and q.shape[-1] <= 256


def expand_kv_heads(kv_block, heads):
    """[batch, kv_heads, seq, head_dim] -> [batch, heads, seq, head_dim]: query head h uses kv head
    h // group (grouped-query attention); the kernels want one key/value head per query head."""
    return kv_block.repeat_interleave(heads // kv_block.shape[1], dim=1)


def sum_over_groups(grad, kv_heads):
    """[batch, heads, seq, head_dim] -> [batch, kv_heads, seq, head_dim]: a kv head's gradient is the sum
    over the query heads of its group."""
    batch, heads, seq, head_dim = grad.shape
    return grad.view(batch, kv_heads, heads // kv_heads, seq, head_dim).sum(dim=2)


def attention_block_forward(q, k, v, causal):
    """Fused attention of queries q over one key/value block (k, v: [batch, kv_heads, k_len, head_dim]):
    out [batch, heads, q_len, head_dim] in q's dtype, and the lse of each query's scores."""
    k, v = expand_kv_heads(k, q.shape[1]), expand_kv_heads(v, q.shape[1])
    if q.device.type == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, is_causal=causal)
    if use_cuda_flash(q):
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, is_causal=causal)[:2]
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, attn_bias=None, compute_log_sumexp=True,
                                                                      is_causal=causal)[:2]
    return out, lse[..., :q.shape[2]]  # the kernel pads lse to a multiple of 32 queries


def attention_block_backward(grad_out, q, k, v, out, lse, causal):
    """Gradients of q, k, v of one block pair (k, v with kv_heads heads), given this block's queries'
    final merged out (in q's dtype) and lse."""
    kv_heads = k.shape[1]
    k, v = expand_kv_heads(k, q.shape[1]), expand_kv_heads(v, q.shape[1])
    lse = lse.contiguous()
    if q.device.type == "cpu":
        grad_q, grad_k, grad_v = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out=out, logsumexp=lse, dropout_p=0.0, is_causal=causal)
    elif use_cuda_flash(q):
        no_rng = torch.empty((), dtype=torch.long)  # dropout is off: no random state to replay
        grad_q, grad_k, grad_v = torch.ops.aten._scaled_dot_product_flash_attention_backward(
            grad_out, q, k, v, out=out, logsumexp=lse, cum_seq_q=None, cum_seq_k=None, max_q=q.shape[2],
            max_k=k.shape[2], dropout_p=0.0, is_causal=causal, philox_seed=no_rng, philox_offset=no_rng)
    else:
        no_rng = torch.empty((), dtype=torch.long)
        padded_lse = F.pad(lse, (0, -q.shape[2] % 32), value=float("inf"))  # the padding the kernel expects
        grad_q, grad_k, grad_v, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
            grad_out, q, k, v, attn_bias=None, out=out, logsumexp=padded_lse, philox_seed=no_rng,
            philox_offset=no_rng, dropout_p=0.0, grad_input_mask=[True, True, True, False], is_causal=causal)
    return grad_q, sum_over_groups(grad_k, kv_heads), sum_over_groups(grad_v, kv_heads)


# The reference: the same two functions spelled out in fp32, readable, slow (every score is materialised).
# tests/cp_attention_check.py holds the fused kernels to them.

def group_queries(t, num_kv_heads):
    """[batch, heads, seq, head_dim] -> [batch, kv_heads, group, seq, head_dim] in fp32: query head h uses kv
    head h // group, so k and v broadcast over the group without being copied."""
    batch, heads, seq, head_dim = t.shape
    return t.reshape(batch, num_kv_heads, heads // num_kv_heads, seq, head_dim).float()


def block_scores(q, k, causal):
    """Attention scores of one block pair in fp32: [batch, kv_heads, group, q_len, k_len]."""
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal:  # the own block: key j is visible to query i when j <= i
        mask = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(mask, float("-inf"))
    return scores


def reference_block_forward(q, k, v, causal):
    """attention_block_forward in fp32 tensor expressions (out in fp32)."""
    k32, v32 = k[:, :, None].float(), v[:, :, None].float()  # [batch, kv_heads, 1, k_len, head_dim]
    scores = block_scores(group_queries(q, k.shape[1]), k32, causal)
    lse = torch.logsumexp(scores, dim=-1)  # [batch, kv_heads, group, q_len]
    out = torch.exp(scores - lse.unsqueeze(-1)) @ v32  # [batch, kv_heads, group, q_len, head_dim]
    return out.reshape(q.shape), lse.reshape(q.shape[:3])


def reference_block_backward(grad_out, q, k, v, out, lse, causal):
    """attention_block_backward in fp32 tensor expressions (gradients in fp32)."""
    kv_heads, scale = k.shape[1], 1.0 / math.sqrt(q.shape[-1])
    q32, grad_out32, out32 = (group_queries(t, kv_heads) for t in (q, grad_out, out))
    k32, v32 = k[:, :, None].float(), v[:, :, None].float()
    lse = lse.reshape(*q32.shape[:4])  # [batch, kv_heads, group, q_len]
    delta = (grad_out32 * out32).sum(dim=-1)  # [batch, kv_heads, group, q_len]
    probs = torch.exp(block_scores(q32, k32, causal) - lse.unsqueeze(-1))  # [batch, kv_heads, group, q_len, k_len]
    grad_v = (probs.transpose(-1, -2) @ grad_out32).sum(dim=2)  # summed over the query heads of a group
    grad_scores = probs * (grad_out32 @ v32.transpose(-1, -2) - delta.unsqueeze(-1))  # softmax backward
    grad_q = grad_scores @ k32 * scale
    grad_k = (grad_scores.transpose(-1, -2) @ q32).sum(dim=2) * scale
    return grad_q.reshape(q.shape), grad_k, grad_v


class RingAttention(torch.autograd.Function):
    """Causal attention of this rank's queries over the keys and values of the whole sequence.
    q: [batch, heads, seq / cp, head_dim]; k, v: [batch, kv_heads, seq / cp, head_dim], zigzag-split."""

    @staticmethod
    def forward(ctx, q, k, v):
        grid = pgm.process_group_manager
        cp_size, cp_rank, local_len = grid.cp_world_size, grid.cp_rank, q.shape[2]
        kv = torch.stack([k, v])  # [2, batch, kv_heads, seq / cp, head_dim]: one message per hop

        out = lse = None  # fp32, whatever the compute dtype: the merge adds many blocks' shares
        for step in range(cp_size):
            kv_rank = (cp_rank - step) % cp_size
            if step + 1 < cp_size:
                exchange = RingExchange(kv, "kv")  # posted first: the next block travels while this one is computed
            query_slice, key_slice, causal = block_plan(cp_rank, kv_rank, local_len)
            log(f"forward step {step + 1}/{cp_size}, kv of cp rank {kv_rank}: "
                f"{describe(query_slice, key_slice, causal, local_len)}")
            block_out, block_lse = attention_block_forward(q[:, :, query_slice], kv[0, :, :, key_slice],
                                                           kv[1, :, :, key_slice], causal=causal)
            block_out = block_out.float()  # [batch, heads, q_len, head_dim]
            if out is None:  # step 0, the own block, covers every query
                out, lse = block_out, block_lse
            else:  # merge by log-sum-exp: both parts end up weighted by exp(their lse - the merged lse)
                merged_lse = torch.logaddexp(lse[..., query_slice], block_lse)
                out[..., query_slice, :] = (
                    out[..., query_slice, :] * torch.exp(lse[..., query_slice] - merged_lse).unsqueeze(-1)
                    + block_out * torch.exp(block_lse - merged_lse).unsqueeze(-1))
                lse[..., query_slice] = merged_lse
            if step + 1 < cp_size:
                kv = exchange.wait()

        out = out.to(q.dtype)  # [batch, heads, seq / cp, head_dim]
        ctx.save_for_backward(q, k, v, out, lse)  # the kernels' backward takes out in q's dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        grad_out = grad_out.contiguous()  # the kernels read head_dim with stride 1; autograd may hand a broadcast
        grid = pgm.process_group_manager
        cp_size, cp_rank, local_len = grid.cp_world_size, grid.cp_rank, q.shape[2]
        grad_q = torch.zeros(q.shape, dtype=torch.float32, device=q.device)

        kv, grad_kv_exchange = torch.stack([k, v]), None
        for step in range(cp_size):
            kv_rank = (cp_rank - step) % cp_size
            if step + 1 < cp_size:
                kv_exchange = RingExchange(kv, "kv")
            query_slice, key_slice, causal = block_plan(cp_rank, kv_rank, local_len)
            log(f"backward step {step + 1}/{cp_size}, kv of cp rank {kv_rank}: "
                f"{describe(query_slice, key_slice, causal, local_len)}")
            block_grad_q, block_grad_k, block_grad_v = attention_block_backward(
                grad_out=grad_out[:, :, query_slice], q=q[:, :, query_slice], k=kv[0, :, :, key_slice],
                v=kv[1, :, :, key_slice], out=out[:, :, query_slice], lse=lse[..., query_slice], causal=causal)
            grad_q[:, :, query_slice] += block_grad_q
            # The gradient of kv_rank's keys and values: this rank's share, plus what the ranks that held
            # this block before it have accumulated (it arrives from the previous rank).
            grad_kv = torch.zeros(kv.shape, dtype=torch.float32, device=kv.device)
            grad_kv[0, :, :, key_slice] = block_grad_k
            grad_kv[1, :, :, key_slice] = block_grad_v
            if grad_kv_exchange is not None:
                grad_kv += grad_kv_exchange.wait()
            # Hand it on with the block: the next rank holds these keys at the next step.
            grad_kv_exchange = RingExchange(grad_kv, "dkv")
            if step + 1 < cp_size:
                kv = kv_exchange.wait()

        # After a full turn the gradient of this rank's own keys and values has come back.
        grad_kv = grad_kv_exchange.wait()
        return grad_q.to(q.dtype), grad_kv[0].to(k.dtype), grad_kv[1].to(v.dtype)


def ring_attention(q, k, v):
    return RingAttention.apply(q, k, v)


def apply_context_parallel(model):
    """Put ring attention over the cp group into every attention layer of a full Llama (the model imports no
    parallel technique: this rank holds only its share of the tokens, and the other ranks' keys and values come
    round the ring); returns it."""
    for layer in model.layers:
        layer.self_attn.attend = ring_attention  # [batch, heads, seq / cp, head_dim] -> the same shape
    return model
