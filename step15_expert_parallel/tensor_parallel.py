"""Tensor parallelism (Megatron-LM style): the ranks of a tp group each hold a slice of every big matrix.

A decoder layer is cut so that each rank works on its own attention heads and its own slice of the
MLP's intermediate features; the hidden state between blocks stays whole on every rank:

    x --copy--> q/k/v (column-parallel: local heads)    --attention--> o    (row-parallel) --all-reduce--> out
    x --copy--> gate/up (column-parallel: local slice)  --silu * -->   down (row-parallel) --all-reduce--> out

`copy` is the identity forward; backward it all-reduces the gradient of x, because each rank's slice contributes
only part of it. The all-reduce after a row-parallel layer sums the ranks' partial products; backward it passes
the gradient through unchanged. So a layer costs 2 all-reduces forward and 2 backward. Attention and MLP share one
`copy` per block (a forward pre-hook on the block) rather than one per projection: q, k and v see the same input,
so their gradients are summed first and all-reduced once.

The embedding is split by vocabulary rows: each rank looks up the ids in its range, writes zeros for
the others, and an all-reduce assembles the full embedding. The LM head is column-parallel over the
vocabulary and all-gathers its output, so every rank holds the full logits and train.py's
cross-entropy is the same line as without tensor parallelism. (A vocab-parallel cross-entropy would
save materialising [batch, seq, vocab] logits on every rank; at this tutorial's vocabulary sizes the
gather is cheap and the loss stays unchanged.)

Exact init: every layer here is built from the full layer of Llama(config) and keeps this rank's contiguous
block of rows (column-parallel, embedding) or columns (row-parallel). In step 12 the full layer is on the meta
device (shapes only) and local_elements later reads this rank's block of the seed's values (weights.py), so a
tp run starts from bit-identical weights. q/k/v rows are head-major, so a block of rows is a block of
heads: rank r holds query heads [r*H/tp, (r+1)*H/tp) and key/value heads [r*KV/tp, (r+1)*KV/tp), which
are exactly the kv heads those query heads use under grouped-query attention whenever tp divides both
(validate_layout checks it, and the vocabulary size and intermediate size, before any collective).

Tied embeddings (config.tie_word_embeddings) stay tied: the embedding and the LM head split the vocabulary rows
the same way, so the sharded LM head reuses the sharded embedding's weight.

Sequence parallelism (step 13, --sequence_parallel; Korthikanti et al. 2022). Outside the blocks above, the
norms and the residual stream hold the same [batch, seq, hidden] activations on every tp rank: tensor parallelism
alone does not shrink them. With sequence parallelism each tp rank keeps 1/tp of the sequence there instead,
and the two collectives of a block change places with the conjugate pair that moves the sequence:

    x [seq/tp] --all-gather--> q/k/v, gate/up (column-parallel) ... o, down (row-parallel) --reduce-scatter--> [seq/tp]

An all-reduce is a reduce-scatter followed by an all-gather, so a block's bytes would be the same; what changes is
that between the blocks no rank holds the whole sequence. Backward runs the conjugates: the gradient of the
all-gather is a reduce-scatter, that of the reduce-scatter an all-gather. A column-parallel linear needs its whole
input again in backward, for its weight's gradient: keeping the gathered input would keep a whole [batch, seq,
hidden] per block on every rank, the very thing sequence parallelism removes. So each column-parallel linear gathers
its input itself and keeps only this rank's part; backward gathers it again (GatheredLinear, as Megatron does). The
price: q, k and v gather the same input three times, gate and up twice, in forward and again in backward (Megatron
fuses q/k/v and gate/up into one matrix each to gather once). The embedding reduce-scatters its output, the LM head
all-gathers its input. A norm's weight now meets only this rank's tokens, so its gradient is a part of the whole:
SequenceParallelRMSNorm sums it over the tp ranks in backward (every rank then holds the same sum, counted once in
the global gradient norm, as before). The sequence is dimension 1 of [batch, seq, hidden]; the collectives move it
to the front (contiguous chunks) and back.
"""
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import process_group_manager as pgm
from model import MLP, RMSNorm, recomputed
from process_group_manager import all_gather, reduce_scatter
from zero_bubble import linear, weight_backward


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


def gather_sequence(x):
    """[batch, seq / tp, ...] of every tp rank -> [batch, seq, ...], the ranks' parts in rank order."""
    grid = pgm.process_group_manager
    x = x.transpose(0, 1).contiguous()  # [seq / tp, batch, ...]: a rank's part is one contiguous block
    whole = x.new_empty((x.shape[0] * grid.tp_world_size, *x.shape[1:]))
    all_gather(whole, x, group=grid.tp_group)
    return whole.transpose(0, 1)  # [batch, seq, ...]


def reduce_scatter_sequence(x):
    """[batch, seq, ...] partial sums on every tp rank -> [batch, seq / tp, ...]: this rank's part of the sum."""
    grid = pgm.process_group_manager
    x = x.transpose(0, 1).contiguous()  # [seq, batch, ...]
    part = x.new_empty((x.shape[0] // grid.tp_world_size, *x.shape[1:]))
    reduce_scatter(part, x, op=dist.ReduceOp.SUM, group=grid.tp_group)
    return part.transpose(0, 1)  # [batch, seq / tp, ...]


class GatheredLinear(torch.autograd.Function):
    """F.linear of the all-gathered sequence that keeps only this rank's part of its input for backward: backward
    all-gathers it again for the weight's gradient, and reduce-scatters the input's gradient (each rank's slice of
    the output features contributes to every token's input)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)  # x: [batch, seq / tp, in]; never the gathered [batch, seq, in]
        ctx.bias = bias
        return F.linear(gather_sequence(x), weight, bias)  # [batch, seq, out / tp]

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        whole = gather_sequence(x)  # [batch, seq, in], gathered again
        grad_input = reduce_scatter_sequence(grad @ weight)  # [batch, seq / tp, in]
        # zb_h1 queues the weight's gradient for its W pass (zero_bubble.py), keeping `whole` until then
        return (grad_input, *weight_backward(weight, ctx.bias, whole, grad))


class ReduceScatterToSequenceParallelRegion(torch.autograd.Function):
    """Forward: reduce-scatter, summing the ranks' partial results and keeping this rank's part of the sequence.
    Backward: all-gather the gradient, which every rank's partial result needs whole."""

    @staticmethod
    def forward(ctx, x):
        return reduce_scatter_sequence(x)

    @staticmethod
    def backward(ctx, grad):
        return gather_sequence(grad)


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
    sequence_parallel: the input arrives as this rank's part of the sequence, all-gathered by GatheredLinear.
    """

    def __init__(self, linear, gather_output=False, copy_input=True, sequence_parallel=False):
        super().__init__()
        start, end = local_range(linear.out_features, "out_features")
        self.weight = shard_parameter(linear.weight[start:end])  # [out / tp, in]
        self.bias = shard_parameter(linear.bias[start:end]) if linear.bias is not None else None
        self.gather_output = gather_output
        self.copy_input = copy_input
        self.sequence_parallel = sequence_parallel

    def forward(self, x):
        if self.sequence_parallel:  # x: [batch, seq / tp, in], gathered inside, kept as this part only
            y = GatheredLinear.apply(x, self.weight, self.bias)  # [batch, seq, out / tp]
        else:
            if self.copy_input:
                x = CopyToTensorParallelRegion.apply(x)  # [batch, seq, in], the same on every rank
            y = linear(x, self.weight, self.bias)  # [batch, seq, out / tp]
        if self.gather_output:
            y = GatherFromTensorParallelRegion.apply(y)  # [batch, seq, out]
        return y


class RowParallelLinear(nn.Module):
    """A linear layer whose input features are split across ranks, built from the full nn.Linear. Its
    input arrives already split (a column-parallel layer's output); each rank multiplies its slice and
    an all-reduce sums the partial products (sequence_parallel: a reduce-scatter, each rank keeping its part of the
    sequence)."""

    def __init__(self, linear, sequence_parallel=False):
        super().__init__()
        start, end = local_range(linear.in_features, "in_features")
        self.weight = shard_parameter(linear.weight[:, start:end])  # [out, in / tp]
        # The bias is added once, after the sum, so every rank keeps all of it.
        self.bias = shard_parameter(linear.bias) if linear.bias is not None else None
        self.sequence_parallel = sequence_parallel

    def forward(self, x):
        partial = linear(x, self.weight)  # [batch, seq, in / tp] -> [batch, seq, out], this rank's share
        if not self.sequence_parallel:
            y = ReduceFromTensorParallelRegion.apply(partial)
            return y if self.bias is None else y + self.bias
        y = ReduceScatterToSequenceParallelRegion.apply(partial)  # [batch, seq / tp, out]
        # the bias meets this rank's tokens only: its gradient summed over tp, as a norm weight's
        return y if self.bias is None else y + CopyToTensorParallelRegion.apply(self.bias)


class VocabParallelEmbedding(nn.Module):
    """An embedding whose vocabulary rows are split across ranks, built from the full nn.Embedding."""

    def __init__(self, embedding, sequence_parallel=False):
        super().__init__()
        self.vocab_start, self.vocab_end = local_range(embedding.num_embeddings, "vocab_size")
        self.weight = shard_parameter(embedding.weight[self.vocab_start:self.vocab_end])  # [vocab / tp, hidden]
        self.sequence_parallel = sequence_parallel

    def forward(self, input_ids):
        outside = (input_ids < self.vocab_start) | (input_ids >= self.vocab_end)  # [batch, seq]
        local_ids = (input_ids - self.vocab_start).masked_fill(outside, 0)
        x = F.embedding(local_ids, self.weight)  # [batch, seq, hidden]
        # Another rank owns these ids: contribute zeros (and receive no gradient for them).
        x = x.masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return ReduceScatterToSequenceParallelRegion.apply(x)  # [batch, seq / tp, hidden]
        return ReduceFromTensorParallelRegion.apply(x)


class SequenceParallelRMSNorm(RMSNorm):
    """RMSNorm over this rank's part of the sequence, with the same weight (and name) as the norm it replaces. The
    weight meets only this rank's tokens, so in backward its gradient is summed over the tp ranks."""

    def __init__(self, norm):
        nn.Module.__init__(self)
        self.weight, self.eps = norm.weight, norm.eps

    def forward(self, x):
        return CopyToTensorParallelRegion.apply(self.weight) * recomputed(self.normalise, x, enabled=self.recompute)


def tp_sharded_parameters(model):
    """The parameters of which each tp rank holds a different shard. Every other one (a norm's weight) each tp rank
    holds whole, with the same gradient: the global gradient norm must count it once, not tp times."""
    layers = (ColumnParallelLinear, RowParallelLinear, VocabParallelEmbedding)
    return {module.weight for module in model.modules() if isinstance(module, layers)}


def tp_split_of_model(model):
    """Local parameter name -> the dimension tensor_parallel.py split it along (unsplit ones are absent):
    column-parallel layers and the embedding by rows (output features, vocabulary), row-parallel by columns."""
    dims = {}
    for prefix, module in model.named_modules():
        if isinstance(module, (ColumnParallelLinear, VocabParallelEmbedding)):
            dims[f"{prefix}.weight"] = dims[f"{prefix}.bias"] = 0
        elif isinstance(module, RowParallelLinear):
            dims[f"{prefix}.weight"] = 1  # its bias is added after the all-reduce: whole on every rank
    return dims


def local_elements(read_block, shape, dim, start, end):
    """Elements [start, end) of this rank's tp shard of a tensor of full `shape`, split along `dim` (None: whole on
    every rank), flattened: from read_block(rows, cols) -> full[rows[0]:rows[1], cols[0]:cols[1]] (a 1-D tensor is
    one column), asking for the rows that hold them and for this rank's columns only."""
    height, width = shape[0], torch.Size(shape[1:]).numel()  # 1-D: one column; 3-D (experts): [E, the rest]
    rows, cols = (0, height), (0, width)
    if dim == 0:
        rows = local_range(height, "rows")
    elif dim == 1:
        cols = local_range(width, "columns")
    width = cols[1] - cols[0]
    first, last = start // width, -(-end // width)  # the rows of the shard that hold [start, end)
    block = read_block((rows[0] + first, rows[0] + last), cols)  # [last - first, width]
    return block.reshape(-1)[start - first * width:end - first * width]


def copy_block_input(module, args):
    """Forward pre-hook: the block's input enters the tensor-parallel region once, for all its projections."""
    return (CopyToTensorParallelRegion.apply(args[0]), *args[1:])


def apply_tensor_parallel(model, sequence_parallel=False):
    """Shard a full Llama in place for this rank's tp group (see the module docstring); returns it."""
    sp = sequence_parallel
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        attn.q_proj = ColumnParallelLinear(attn.q_proj, copy_input=False, sequence_parallel=sp)  # local query heads
        attn.k_proj = ColumnParallelLinear(attn.k_proj, copy_input=False, sequence_parallel=sp)  # local kv heads
        attn.v_proj = ColumnParallelLinear(attn.v_proj, copy_input=False, sequence_parallel=sp)
        attn.o_proj = RowParallelLinear(attn.o_proj, sequence_parallel=sp)
        if isinstance(mlp, MLP):  # a mixture of experts stays whole on every tp rank (expert_parallel.py)
            mlp.gate_proj = ColumnParallelLinear(mlp.gate_proj, copy_input=False, sequence_parallel=sp)  # local slice
            mlp.up_proj = ColumnParallelLinear(mlp.up_proj, copy_input=False, sequence_parallel=sp)
            mlp.down_proj = RowParallelLinear(mlp.down_proj, sequence_parallel=sp)
        if not sp:  # under sequence parallelism each column-parallel linear gathers its own input
            for block in (attn, mlp) if isinstance(mlp, MLP) else (attn,):
                block.register_forward_pre_hook(copy_block_input)
        else:
            layer.input_layernorm = SequenceParallelRMSNorm(layer.input_layernorm)
            layer.post_attention_layernorm = SequenceParallelRMSNorm(layer.post_attention_layernorm)
    if sp:
        model.norm = SequenceParallelRMSNorm(model.norm)

    tied = model.lm_head.weight is model.embed_tokens.weight
    model.embed_tokens = VocabParallelEmbedding(model.embed_tokens, sequence_parallel=sp)
    # [batch, seq, vocab] on every rank (under sequence parallelism the input is all-gathered first)
    model.lm_head = ColumnParallelLinear(model.lm_head, gather_output=True, sequence_parallel=sp)
    if tied:
        model.lm_head.weight = model.embed_tokens.weight
    return model
