"""Tensor parallelism (Megatron-LM style): the ranks of a tp group each hold a slice of every big matrix.

A decoder layer is cut so that each rank works on its own attention heads and its own slice of the
MLP's intermediate features; the hidden state between blocks stays whole on every rank:

    x --copy--> q/k/v (column-parallel: local heads)    --attention--> o    (row-parallel) --all-reduce--> out
    x --copy--> gate/up (column-parallel: local slice)  --silu * -->   down (row-parallel) --all-reduce--> out

`copy` is the identity forward; backward it all-reduces the gradient of x, because each rank's slice
contributes only part of it. The all-reduce after a row-parallel layer sums the ranks' partial
products; backward it passes the gradient through unchanged. So a layer costs 2 all-reduces forward
and 2 backward. Attention and MLP share one `copy` per block (a forward pre-hook on the block) rather
than one per projection: q, k and v see the same input, so their gradients are summed first and
all-reduced once.

The embedding is split by vocabulary rows: each rank looks up the ids in its range, writes zeros for
the others, and an all-reduce assembles the full embedding. The LM head is column-parallel over the
vocabulary and all-gathers its output, so every rank holds the full logits and train.py's
cross-entropy is the same line as without tensor parallelism. (A vocab-parallel cross-entropy would
save materialising [batch, seq, vocab] logits on every rank; at this tutorial's vocabulary sizes the
gather is cheap and the loss stays unchanged.)

Exact init: every layer here is built from the full layer that Llama(config) created from the seed and
keeps this rank's contiguous block of rows (column-parallel, embedding) or columns (row-parallel), so a
tp run starts from bit-identical weights. q/k/v rows are head-major, so a block of rows is a block of
heads: rank r holds query heads [r*H/tp, (r+1)*H/tp) and key/value heads [r*KV/tp, (r+1)*KV/tp), which
are exactly the kv heads those query heads use under grouped-query attention whenever tp divides both
(validate_layout checks it, and the vocabulary size and intermediate size, before any collective).

Tied embeddings (config.tie_word_embeddings) stay tied: the embedding and the LM head split the
vocabulary rows the same way, so the sharded LM head reuses the sharded embedding's weight.
"""
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import process_group_manager as pgm


def all_reduce_sum(x):
    # all_reduce works in place: reduce a copy, so tensors that autograd holds on to stay untouched.
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM, group=pgm.process_group_manager.tp_group)
    return x


class CopyToTensorParallelRegion(torch.autograd.Function):
    """Forward: identity. Backward: all-reduce, summing the input gradients of every rank's slice."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return all_reduce_sum(grad)


class ReduceFromTensorParallelRegion(torch.autograd.Function):
    """Forward: all-reduce, summing the ranks' partial results. Backward: identity, since each partial
    result enters the sum with weight 1."""

    @staticmethod
    def forward(ctx, x):
        return all_reduce_sum(x)

    @staticmethod
    def backward(ctx, grad):
        return grad


class GatherFromTensorParallelRegion(torch.autograd.Function):
    """Forward: all-gather the ranks' slices along the last dim. Backward: keep this rank's slice."""

    @staticmethod
    def forward(ctx, x):
        grid = pgm.process_group_manager
        slices = [torch.empty_like(x) for _ in range(grid.tp_world_size)]
        dist.all_gather(slices, x.contiguous(), group=grid.tp_group)
        return torch.cat(slices, dim=-1)  # [..., last * tp]

    @staticmethod
    def backward(ctx, grad):
        grid = pgm.process_group_manager
        return grad.chunk(grid.tp_world_size, dim=-1)[grid.tp_rank].contiguous()  # [..., last / tp]


def local_range(size, name):
    """This rank's contiguous block [start, end) of `size` rows or columns."""
    tp_size, tp_rank = pgm.process_group_manager.tp_world_size, pgm.process_group_manager.tp_rank
    if size % tp_size != 0:
        raise ValueError(f"{name} {size} is not divisible by tp_size {tp_size}")
    shard = size // tp_size
    return tp_rank * shard, (tp_rank + 1) * shard


def shard_parameter(tensor):
    # clone: the shard gets its own storage, so the full tensor can be freed.
    return nn.Parameter(tensor.detach().clone())


class ColumnParallelLinear(nn.Module):
    """A linear layer whose output features are split across ranks, built from the full nn.Linear.

    copy_input=False when the caller has already passed the input through CopyToTensorParallelRegion
    once for several layers that share it. gather_output=True all-gathers the full output features.
    """

    def __init__(self, linear, gather_output=False, copy_input=True):
        super().__init__()
        start, end = local_range(linear.out_features, "out_features")
        self.weight = shard_parameter(linear.weight[start:end])  # [out / tp, in]
        self.bias = shard_parameter(linear.bias[start:end]) if linear.bias is not None else None
        self.gather_output = gather_output
        self.copy_input = copy_input

    def forward(self, x):
        if self.copy_input:
            x = CopyToTensorParallelRegion.apply(x)  # [batch, seq, in], the same on every rank
        y = F.linear(x, self.weight, self.bias)  # [batch, seq, out / tp]
        if self.gather_output:
            y = GatherFromTensorParallelRegion.apply(y)  # [batch, seq, out]
        return y


class RowParallelLinear(nn.Module):
    """A linear layer whose input features are split across ranks, built from the full nn.Linear. Its
    input arrives already split (a column-parallel layer's output); each rank multiplies its slice and
    an all-reduce sums the partial products."""

    def __init__(self, linear):
        super().__init__()
        start, end = local_range(linear.in_features, "in_features")
        self.weight = shard_parameter(linear.weight[:, start:end])  # [out, in / tp]
        # The bias is added once, after the sum, so every rank keeps all of it.
        self.bias = shard_parameter(linear.bias) if linear.bias is not None else None

    def forward(self, x):
        partial = F.linear(x, self.weight)  # [batch, seq, in / tp] -> [batch, seq, out], this rank's share
        y = ReduceFromTensorParallelRegion.apply(partial)
        return y if self.bias is None else y + self.bias


class VocabParallelEmbedding(nn.Module):
    """An embedding whose vocabulary rows are split across ranks, built from the full nn.Embedding."""

    def __init__(self, embedding):
        super().__init__()
        self.vocab_start, self.vocab_end = local_range(embedding.num_embeddings, "vocab_size")
        self.weight = shard_parameter(embedding.weight[self.vocab_start:self.vocab_end])  # [vocab / tp, hidden]

    def forward(self, input_ids):
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)  # [batch, seq]
        local_ids = (input_ids - self.vocab_start).masked_fill(outside, 0)
        x = F.embedding(local_ids, self.weight)  # [batch, seq, hidden]
        # Another rank owns these ids: contribute zeros (and receive no gradient for them).
        x = x.masked_fill(outside.unsqueeze(-1), 0.0)
        return ReduceFromTensorParallelRegion.apply(x)


def tp_sharded_parameters(model):
    """The parameters of which each tp rank holds a different shard. Every other one (a norm's weight) each tp rank
    holds whole, with the same gradient: the global gradient norm must count it once, not tp times."""
    layers = (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)
    return {module.weight for module in model.modules() if isinstance(module, layers)}


def copy_block_input(module, args):
    """Forward pre-hook: the block's input enters the tensor-parallel region once, for all its projections."""
    return (CopyToTensorParallelRegion.apply(args[0]), *args[1:])


def apply_tensor_parallel(model):
    """Shard a full Llama in place for this rank's tp group (see the module docstring); returns it."""
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.q_proj = ColumnParallelLinear(attn.q_proj, copy_input=False)  # local query heads
        attn.k_proj = ColumnParallelLinear(attn.k_proj, copy_input=False)  # local key/value heads
        attn.v_proj = ColumnParallelLinear(attn.v_proj, copy_input=False)
        attn.o_proj = RowParallelLinear(attn.o_proj)
        mlp.gate_proj = ColumnParallelLinear(mlp.gate_proj, copy_input=False)  # local intermediate slice
        mlp.up_proj = ColumnParallelLinear(mlp.up_proj, copy_input=False)
        mlp.down_proj = RowParallelLinear(mlp.down_proj)
        attn.register_forward_pre_hook(copy_block_input)
        mlp.register_forward_pre_hook(copy_block_input)

    tied = model.lm_head.weight is model.embed_tokens.weight
    model.embed_tokens = VocabParallelEmbedding(model.embed_tokens)
    model.lm_head = ColumnParallelLinear(model.lm_head, gather_output=True)  # [batch, seq, vocab] on every rank
    if tied:
        model.lm_head.weight = model.embed_tokens.weight
    return model
