"""Mixed precision with an fp32 master, and ZeRO-1/2/3: the optimizer state, the gradients and (stage 3) the
parameters sharded over the ranks that hold the same weights (Rajbhandari et al. 2020, "ZeRO: Memory
Optimizations Toward Training Trillion Parameter Models"; stage 3 is what PyTorch calls fully sharded data
parallelism, FSDP).

    model = ZeroDataParallel(model, zero_stage=2, bucket_size_mb=25)
    optimizer = ZeroAdamW(model, lr=1e-3, weight_decay=0.1)
    model.zero_grad()
    for i in range(grad_acc_steps):
        model.require_backward_grad_sync = i == grad_acc_steps - 1
        loss = ...; loss.backward()
    model.finish_gradient_synchronization()  # wait: every rank has the mean gradient of what it owns
    optimizer.clip_grad_norm(max_norm=1.0)  # the global norm, from every rank's pieces
    optimizer.step()  # AdamW on the owned fp32 slices, cast into the parameters, all-gather the rest

Mixed precision. The model computes in its own dtype (bf16 on a GPU). Gradients accumulate in fp32 buckets
(step 6), and the optimizer updates an fp32 *master* copy of the weights with fp32 AdamW moments; after each
step the master is cast back into the compute parameters. bf16 keeps 8 bits of mantissa: an update smaller
than about 1/256 of a weight is rounded away when AdamW updates bf16 weights directly, but accumulates in the
fp32 master. At fp32 the master *is* the parameter: no second copy.

Buckets and shards. Parameters are grouped into buckets as in step 6, and each bucket's parameters become
views into one flat buffer of the compute dtype (so an all-gather writes straight into them) beside one flat
fp32 gradient buffer. Both are padded to a multiple of N = dp x cp ranks and cut into N contiguous pieces:
rank i owns piece i of every bucket (Megatron's distributed optimizer cuts the same way).

    bucket buffer   | rank 0's piece | rank 1's piece | ... | rank N-1's piece (+ padding) |
    reduce-scatter  -> each rank receives the sum of its piece over the N ranks
    AdamW           -> each rank updates the fp32 master and moments of its piece only
    all-gather      -> every rank receives every piece of the updated (compute-dtype) parameters

Bytes per parameter per rank (Psi parameters, bf16 compute, fp32 gradients):

    stage 0   2 params + 4 gradients + 12 master and moments (4 + 4 + 4)   = 18 Psi
    stage 1   the master and moments sharded                                = 6 Psi + 12 Psi / N
    stage 2   the gradients too: a bucket's full fp32 buffer exists only     = 2 Psi + 16 Psi / N
              while backward fills it and its reduce-scatter runs; then only the owned piece stays
    stage 3   the parameters too: each rank keeps its piece of them          = 18 Psi / N
              (+ the units gathered in flight, at most two)

Communication. A ring all-reduce of B bytes is a reduce-scatter followed by an all-gather: each rank sends
(N-1)/N x B in each half, 2 (N-1)/N x B in all. ZeRO-1 runs the two halves itself, the reduce-scatter on the
fp32 gradients and the all-gather on the updated parameters, so it sends the same bytes as data parallelism
(fewer in bf16: the all-gather carries 2-byte parameters, not 4-byte gradients), while each rank updates 1/N of
the weights. ZeRO-2 reduce-scatters every micro-batch instead of accumulating locally first: under gradient
accumulation with k micro-batches it sends k reduce-scatters per bucket per step instead of one.
That is NCCL's arithmetic (ring collectives, (N-1)/N x B each). gloo, on the CPU, is not built for these two:
measured with torch 2.13 on 2 ranks of a 2-core CPU, 32 MB of fp32: all-reduce 26 ms, reduce-scatter 65 ms,
all-gather 87 ms. So on the CPU ZeRO saves memory and costs time. Where the links carry the bytes beside the
compute (NCCL on GPUs), the all-gather hides: ZeroAdamW.step starts it and does not wait, and the next forward
waits for each bucket only just before a module uses it, so the later buckets arrive while the first layers
compute (Megatron's overlapped parameter gather).

ZeRO-3 (fully sharded). The buckets are *units* instead of 25 MB groups: the embedding, each decoder layer,
the final norm with the LM head. Between units a rank holds only its piece of each: param_shard (compute
dtype), the fp32 master and moments, grad_shard. A unit's full parameters exist only around its compute:

    forward    pre-hook: wait for the unit's all-gather (prefetched), start the next unit's    | full params
               the unit's forward                                                           | of unit i
               post-hook: free the full parameters (the storage, not the tensors: autograd     |
               keeps them for backward), hook the output's gradient
    backward   output gradient hook: gather again (prefetched), start the previous unit's     | full params
               the unit's backward                                                          | of unit i
               its last gradient: reduce-scatter the unit's gradients, free the parameters    |

so at any moment the unit computing and the one being prefetched are whole: two units, never the model. Two
units skip a step: the last one (the norm with the LM head) is not freed after its forward, since its backward
comes next; and the embedding is not gathered for backward, since an embedding's weight gradient is a scatter of
its output's gradient and reads no weight. A tied LM head is the embedding's weight: embedding, norm and head
are then one unit, needed at both ends of the forward and the backward, and it stays whole from the embedding's
forward to its last gradient: three units at most, it and the two layers around the one computing.
The price is communication, on every micro-batch: two all-gathers of the parameters (forward, backward; one for
the embedding and the last unit) and the reduce-scatter of the gradients. Per rank, in units of (N-1)/N x Psi
bytes: 2 + 2 + 4 = 8 in bf16 (12 in fp32) per micro-batch, against 8 per optimizer step for data parallelism's all-reduce of the fp32
gradients. With one micro-batch per step that is the same bytes in bf16; with k micro-batches, k times.
"""
import functools
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn

import process_group_manager as pgm
from optimizer import decays, sum_of_squares
from tensor_parallel import tp_sharded_parameters

# torch 2.13 renamed these two collectives (the old names warn); earlier releases have only the old names.
reduce_scatter = getattr(dist, "reduce_scatter_single", dist.reduce_scatter_tensor)
all_gather = getattr(dist, "all_gather_single", dist.all_gather_into_tensor)

ZERO_STAGES = (0, 1, 2, 3)
# ZeRO-2/3: a bucket's full fp32 gradient buffer lives while backward fills it and while it is being reduced;
# at most this many reductions are in flight before the oldest is waited for and its buffer freed.
MAX_REDUCTIONS_IN_FLIGHT = 2


def group_into_buckets(params, bucket_size_mb):
    """Consecutive runs of params, each at most bucket_size_mb of fp32 gradients (a larger parameter
    gets a bucket of its own)."""
    max_numel = int(bucket_size_mb * 2**20) // 4  # fp32 gradients: 4 bytes each
    groups = [[]]
    numel = 0
    for param in params:
        if groups[-1] and numel + param.numel() > max_numel:
            groups.append([])
            numel = 0
        groups[-1].append(param)
        numel += param.numel()
    return groups


class ZeroStage(NamedTuple):
    """What a zero stage shards over the dp x cp ranks, named once: stage 1 the optimizer state, stage 2 the
    gradients too, stage 3 the parameters too."""
    shards_optimizer_state: bool  # stages 1-3: each rank keeps and updates the AdamW state of its piece only
    shards_gradients: bool  # stages 2, 3: each micro-batch reduce-scatters, and only the owned piece is kept
    shards_parameters: bool  # stage 3: each rank keeps its piece of the parameters, a unit gathered to compute

    @classmethod
    def of(cls, zero_stage):
        return cls(shards_optimizer_state=zero_stage >= 1, shards_gradients=zero_stage >= 2,
                   shards_parameters=zero_stage >= 3)


class ShardedBucket:
    """Parameters whose values share one flat buffer of the compute dtype, and whose gradients share one flat
    fp32 buffer; both cut into N pieces, one owned by each rank of the dp x cp group. Under ZeRO-3 a bucket is
    one unit (a decoder layer, say), and its parameter buffer has memory only while the unit is gathered."""

    def __init__(self, params, stage, group, device=None):
        self.params = params
        self.stage = stage
        self.group = group
        self.num_ranks = dist.get_world_size(group) if group is not None else 1
        rank = dist.get_rank(group) if group is not None else 0
        numel = sum(p.numel() for p in params)
        self.padded_numel = -(-numel // self.num_ranks) * self.num_ranks  # a multiple of N
        piece = self.padded_numel // self.num_ranks
        # Stage 0 updates the whole bucket on every rank; stages 1 to 3 only rank i's piece.
        sharded = stage.shards_optimizer_state
        self.owned = slice(rank * piece, (rank + 1) * piece) if sharded else slice(0, self.padded_numel)
        self.shards_optimizer_state = sharded and self.num_ranks > 1  # each rank owns its own piece
        first = params[0]
        on_meta = first.is_meta  # built on the meta device (train.py): load_parameters gives the values later
        device = first.device if device is None else device
        # ZeRO-3: the rank keeps its piece of the parameters in a tensor of its own, and the full buffer's
        # memory exists only while the unit is gathered (the parameters stay views into it all along).
        self.shards_params = stage.shards_parameters and self.num_ranks > 1
        # ZeRO-3 frees the buffer at once: torch.empty, whose pages never written take no memory
        allocate = torch.empty if self.shards_params else torch.zeros
        self.param_buffer = allocate(self.padded_numel, dtype=first.dtype, device=device)
        self.offsets = []  # each parameter's place in the flat buffers
        offset = 0
        for param in params:
            view = self.param_buffer[offset:offset + param.numel()].view_as(param)
            if on_meta:  # the same Parameter object (a tied one stays tied), moved off the meta device
                torch.utils.swap_tensors(param, nn.Parameter(view.new_empty(0), requires_grad=param.requires_grad))
            else:  # a model built whole (the checks and the benchmarks build one): its values into the buffer
                view.copy_(param.detach())
            param.data = view  # .data: a view of the buffer's memory, with a version counter of its own
            self.offsets.append(offset)
            offset += param.numel()
        self.param_buffer[offset:].zero_()  # the padding (torch.empty's would hold anything)
        self.param_shard = self.param_buffer[self.owned].clone() if self.shards_params else self.param_buffer[self.owned]
        self.gather_handle = None
        if self.shards_params:
            self.free_parameters()
        # fp32: the master is the parameter itself; otherwise an fp32 copy of the owned piece.
        self.master_is_param = first.dtype == torch.float32
        self.master = self.param_shard if self.master_is_param else self.param_shard.float()
        self.grad_buffer = None  # [padded_numel] fp32
        # ZeRO-2/3 keep only the owned piece of the gradient between micro-batches; the others use grad_buffer's.
        self.grad_shard = torch.zeros_like(self.master) if stage.shards_gradients else None
        self.num_ready = 0
        self.handle = None
        if not stage.shards_gradients:
            self.allocate_grad_buffer()

    def gather_parameters(self):
        """ZeRO-3: start the all-gather that makes the unit's parameters whole (nothing if they are, or are on
        their way)."""
        if self.gather_handle is not None or self.param_buffer.untyped_storage().size() > 0:
            return
        self.param_buffer.untyped_storage().resize_(self.padded_numel * self.param_buffer.element_size())
        self.gather_handle = all_gather(self.param_buffer, self.param_shard, group=self.group, async_op=True)

    def wait_parameters(self):
        self.gather_parameters()
        self.finish_gather()

    def finish_gather(self):
        """Wait for the all-gather in flight, if one is (ZeRO-3's, or the one ZeroAdamW.step starts at stages 1, 2)."""
        if self.gather_handle is not None:
            self.gather_handle.wait()
            self.gather_handle = None

    def free_parameters(self):
        """ZeRO-3: give back the memory of the full parameters; the parameter tensors stay, with no storage."""
        self.param_buffer.untyped_storage().resize_(0)

    def allocate_grad_buffer(self):
        self.grad_buffer = torch.zeros(self.padded_numel, dtype=torch.float32, device=self.param_buffer.device)
        for param, offset in zip(self.params, self.offsets):
            param.main_grad = self.grad_buffer[offset:offset + param.numel()].view_as(param)

    def mark_ready(self):
        """One more parameter has its final gradient of this backward; the last one starts the reduction.
        Returns whether it did."""
        self.num_ready += 1
        if self.num_ready < len(self.params):
            return False
        self.num_ready = 0
        if self.num_ranks == 1:
            self.handle = None
        elif not self.stage.shards_optimizer_state:
            self.handle = dist.all_reduce(self.grad_buffer, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        else:
            # In place: the sum of rank i's piece over the N ranks lands in rank i's piece of grad_buffer.
            self.handle = reduce_scatter(self.grad_buffer[self.owned], self.grad_buffer, op=dist.ReduceOp.SUM,
                                         group=self.group, async_op=True)
        return True

    def finish_reduction(self):
        """Wait for the bucket's reduction; at stages 2, 3 add the owned piece to the shard and free the buffer."""
        if self.handle is not None:
            self.handle.wait()
            self.handle = None
        if self.stage.shards_gradients and self.grad_buffer is not None:
            self.grad_shard += self.grad_buffer[self.owned]
            self.grad_buffer = None  # the full fp32 gradient of the bucket is gone until the next backward
            for param in self.params:
                param.main_grad = None

    def owned_grad(self):
        """The gradient of the owned piece: summed over the N ranks, averaged once finish_gradient_synchronization
        divided it by N."""
        return self.grad_shard if self.stage.shards_gradients else self.grad_buffer[self.owned]

    def owned_pieces(self):
        """(param, start, end, piece) for every parameter that overlaps the piece this rank owns: [start, end) is the
        overlap as a range of the flattened parameter, piece the same elements as a slice of the owned piece (of the
        master, of an AdamW moment, of the gradient)."""
        for param, offset in zip(self.params, self.offsets):
            start, end = max(offset, self.owned.start), min(offset + param.numel(), self.owned.stop)
            if start < end:
                yield param, start - offset, end - offset, slice(start - self.owned.start, end - self.owned.start)

    def reset(self):
        self.num_ready = 0
        self.handle = None
        if self.stage.shards_gradients:
            self.grad_shard.zero_()
        else:
            self.grad_buffer.zero_()


def decoder_units(module):
    """ZeRO-3's units, in the order forward runs them: lists of modules whose parameters are gathered together.
    The embedding, each decoder layer, the final norm with the LM head (of those this pipeline stage holds).
    A tied LM head is the embedding's weight: then embedding, norm and head are one unit, whole from the
    embedding's forward to the embedding's backward, beside the two layers in flight."""
    first = [module.embed_tokens] if module.embed_tokens is not None else []
    last = [m for m in (module.norm, module.lm_head) if m is not None]
    layers = [[layer] for layer in module.layers]
    if first and module.lm_head is not None and module.lm_head.weight is module.embed_tokens.weight:
        return [first + last] + layers
    return [unit for unit in [first, *layers, last] if unit]


class ZeroDataParallel(nn.Module):
    """Data parallelism over the dp x cp group whose gradients end up sharded (stages 1 to 3) or whole (stage 0)
    in fp32, and at stage 3 the parameters too; at dp x cp = 1 it is the fp32 gradient accumulator that mixed
    precision needs."""

    def __init__(self, module, zero_stage=0, bucket_size_mb=25, device=None):
        """module: built whole, or on the meta device (then every buffer is allocated on `device`, and
        load_parameters gives the parameters their values)."""
        super().__init__()
        self.module = module
        self.zero_stage = zero_stage
        self.stage = ZeroStage.of(zero_stage)
        # False during the gradient-accumulation micro-batches of stages 0 and 1: their gradients only accumulate
        # locally. Stages 2 and 3 reduce every micro-batch, so that only the owned piece is kept between them.
        self.require_backward_grad_sync = True
        grid = pgm.process_group_manager
        group = grid.cp_dp_group if grid.cp_dp_world_size > 1 else None
        params = [p for p in module.parameters() if p.requires_grad]
        if self.stage.shards_parameters:  # a bucket per unit, in forward order
            units = decoder_units(module)
            groups = [list(dict.fromkeys(p for m in unit for p in m.parameters() if p.requires_grad)) for unit in units]
            if sum(len(g) for g in groups) != len(params):
                raise ValueError("ZeRO-3 gathers the embedding, the decoder layers and the final norm with the LM "
                                 "head; this model has parameters outside them")
        else:
            groups = group_into_buckets(params[::-1], bucket_size_mb)
        self.buckets = [ShardedBucket(bucket_params, self.stage, group, device) for bucket_params in groups]
        self.in_flight = []  # buckets whose reduction was started and not yet waited for, oldest first
        for bucket in self.buckets:
            for param in bucket.params:
                param.register_post_accumulate_grad_hook(functools.partial(self._gradient_ready, bucket))
        if self.stage.shards_optimizer_state and not self.stage.shards_parameters and group is not None:
            # ZeRO-1/2: ZeroAdamW.step all-gathers the updated parameters without waiting; each module waits for the
            # buckets of its own parameters just before its forward (Megatron's overlapped parameter gather), so
            # the gathers of the later buckets run while the first layers compute.
            bucket_of = {param: bucket for bucket in self.buckets for param in bucket.params}
            for submodule in module.modules():
                buckets = {bucket_of[p] for p in submodule.parameters(recurse=False) if p in bucket_of}
                if buckets:
                    submodule.register_forward_pre_hook(functools.partial(self._wait_for_gathers, list(buckets)))
        if self.stage.shards_parameters and group is not None:
            # An embedding alone needs no weight in backward (its weight gradient scatters the output's gradient).
            self.gathered_for_backward = [unit != [getattr(module, "embed_tokens", None)] for unit in units]
            # A tied unit (embedding, norm, head) comes first, and its forward ends last, with the head's.
            self.tied_unit_first = any(m is getattr(module, "lm_head", None) for m in units[0])
            self.last_in_forward = 0 if self.tied_unit_first else len(units) - 1
            for index, unit in enumerate(units):
                unit[0].register_forward_pre_hook(functools.partial(self._before_forward, index))
                unit[-1].register_forward_hook(functools.partial(self._after_forward, index))

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def load_parameters(self, read, exact_master):
        """Give this rank what it keeps of every parameter, in the model's order: all of it (its tp shard) at stages
        0 to 2, the piece it owns at stage 3; and the fp32 master of the owned piece. read(name, start, end) gives
        the elements [start, end) of parameter `name` (as self.module names it; this rank's tp shard, flattened) in
        fp32. exact_master: the master takes read's fp32 values (a checkpoint's); otherwise the parameters' (an
        initialisation: the model in its compute dtype, as every earlier step casts it)."""
        place = {param: (bucket, offset)
                 for bucket in self.buckets for param, offset in zip(bucket.params, bucket.offsets)}
        with torch.no_grad():
            for name, param in self.module.named_parameters():
                bucket, offset = place[param]
                owned = bucket.owned
                start, end = offset, offset + param.numel()  # where it lies in the bucket
                if bucket.shards_params:
                    start, end = max(start, owned.start), min(end, owned.stop)
                if start >= end:
                    continue  # no element of it is this rank's
                values = read(name, start - offset, end - offset)
                if bucket.shards_params:
                    bucket.param_shard[start - owned.start:end - owned.start].copy_(values)
                else:
                    bucket.param_buffer[start:end].copy_(values)
                first, last = max(start, owned.start), min(end, owned.stop)
                if exact_master and first < last:
                    bucket.master[first - owned.start:last - owned.start].copy_(values[first - start:last - start])
            for bucket in self.buckets:
                if not exact_master and not bucket.master_is_param:
                    bucket.master.copy_(bucket.param_shard)

    def _wait_for_gathers(self, buckets, module, args):
        for bucket in buckets:
            bucket.finish_gather()

    def finish_parameter_gathers(self):
        """Wait for every all-gather of updated parameters still in flight: before the parameters are read other
        than by a forward (a checkpoint, a comparison) and before the process group goes."""
        for bucket in self.buckets:
            bucket.finish_gather()

    def _before_forward(self, index, module, args):
        self.buckets[index].wait_parameters()  # unit index is whole from here ...
        if index + 1 < len(self.buckets):
            self.buckets[index + 1].gather_parameters()  # prefetch: the next unit's gather overlaps this compute

    def _after_forward(self, index, module, args, output):
        if index != self.last_in_forward:  # that one stays whole: its backward is the next thing to run
            self.buckets[index].free_parameters()  # ... to here
        if output.requires_grad and self.gathered_for_backward[index]:  # the gradient arrives just before the
            output.register_hook(functools.partial(self._before_backward, index))  # unit's backward starts

    def _before_backward(self, index, output_grad):
        self.buckets[index].wait_parameters()  # whole again until its last gradient (_gradient_ready)
        # Prefetch: backward runs the units in reverse. A tied unit's hook is the LM head's: the last layer is next.
        previous = index - 1 if index > 0 else (len(self.buckets) - 1 if self.tied_unit_first else None)
        if previous is not None and self.gathered_for_backward[previous]:
            self.buckets[previous].gather_parameters()

    def _gradient_ready(self, bucket, param):
        if self.stage.shards_gradients and bucket.num_ready == 0:  # the bucket's first gradient of this backward
            if bucket in self.in_flight:  # still reducing the previous micro-batch's gradients
                self.in_flight.remove(bucket)
                bucket.finish_reduction()
            bucket.allocate_grad_buffer()
        param.main_grad.add_(param.grad)
        param.grad = None
        if (self.require_backward_grad_sync or self.stage.shards_gradients) and bucket.mark_ready():
            self.in_flight.append(bucket)
            if self.stage.shards_gradients and len(self.in_flight) > MAX_REDUCTIONS_IN_FLIGHT:
                self.in_flight.pop(0).finish_reduction()
            if bucket.shards_params:
                bucket.free_parameters()  # the unit's backward is over: no gradient needs its weights any more

    def finish_gradient_synchronization(self):
        """Wait for every bucket's reduction; then each rank holds the averaged gradient of the piece it owns."""
        for bucket in self.in_flight:
            bucket.finish_reduction()
        self.in_flight = []
        for bucket in self.buckets:
            if bucket.num_ranks > 1:
                bucket.owned_grad().div_(bucket.num_ranks)  # gloo has no ReduceOp.AVG: the reductions summed
        for bucket in self.buckets:
            if bucket.grad_buffer is not None and bucket.num_ready:
                names = ", ".join(str(tuple(p.shape)) for p in bucket.params)
                raise RuntimeError(f"a gradient bucket was never reduced: some of its parameters ({names}) got no "
                                   f"gradient in the last backward (unused parameters are not supported)")

    def zero_grad(self, set_to_none=True):
        super().zero_grad(set_to_none)
        for bucket in self.buckets:
            bucket.reset()


class OwnedPiece(NamedTuple):
    """The elements of one parameter inside the piece of a bucket that this rank owns."""
    bucket: ShardedBucket
    piece: slice  # where they sit in the owned piece
    master: torch.Tensor  # the fp32 master's view of them: what AdamW updates
    decays: bool  # a matrix's elements, not a norm weight's
    counted: bool  # this rank counts them in the global gradient norm (a norm weight: tp rank 0 only)


class ZeroAdamW:
    """torch.optim.AdamW on the fp32 master pieces this rank owns, cut at its parameters' boundaries: a view of the
    master per parameter that overlaps the owned piece, in the decay group if the parameter is a matrix (AdamW is
    elementwise, so each view is updated exactly as its parameter's elements would be). clip_grad_norm, before the
    step, finds the global gradient norm from the owned fp32 gradient pieces and scales them; after the step the
    master is cast into the compute parameters and, under ZeRO-1/2, every rank's updated piece is all-gathered
    (waited for by the next forward, bucket by bucket; under ZeRO-3 the next forward gathers each unit when it
    needs it)."""

    def __init__(self, model, lr, weight_decay=0.01):
        grid = pgm.process_group_manager
        self.buckets = model.buckets
        tp_sharded = tp_sharded_parameters(model)
        self.pieces = [OwnedPiece(bucket, piece, bucket.master[piece], decays=decays(param),
                                  counted=param in tp_sharded or grid.tp_rank == 0)
                       for bucket in self.buckets for param, _, _, piece in bucket.owned_pieces()]
        self.optimizer = torch.optim.AdamW(
            [{"params": [p.master for p in self.pieces if p.decays], "weight_decay": weight_decay},
             {"params": [p.master for p in self.pieces if not p.decays], "weight_decay": 0.0}], lr=lr)

    def clip_grad_norm(self, max_norm):
        """The global L2 norm of the averaged gradients, before clipping, and the clip (max_norm > 0): every owned
        fp32 gradient piece scaled by max_norm / (norm + 1e-6) if that is below 1, before AdamW sees it. Each element
        of the model's gradient is counted once: this rank adds the squares of the pieces it owns (padding belongs
        to none), summed over the dp x cp group (stages 1 to 3: the pieces are disjoint; stage 0: every rank owns
        all, nothing to add), then over tp (shards; a norm weight is counted by tp rank 0 only) and pp (stages)."""
        grid = pgm.process_group_manager
        grads = [piece.bucket.owned_grad()[piece.piece] for piece in self.pieces if piece.counted]
        squares = sum_of_squares(grads, self.buckets[0].master.device)
        if self.buckets[0].shards_optimizer_state:
            dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=grid.cp_dp_group)
        if grid.tp_world_size > 1:
            dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=grid.tp_group)
        if grid.pp_world_size > 1:
            dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=grid.pp_group)
        norm = squares.sqrt().float()
        if max_norm > 0:
            scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
            for bucket in self.buckets:
                bucket.owned_grad().mul_(scale)
        return norm

    def step(self):
        for piece in self.pieces:
            piece.master.grad = piece.bucket.owned_grad()[piece.piece]
        self.optimizer.step()
        # In the order the next forward needs them: the buckets were made in backward's order (last layer first),
        # and a group runs its collectives in the order they start, so the embedding's gather goes first.
        for bucket in reversed(self.buckets):
            owned = bucket.param_shard
            if not bucket.master_is_param:
                owned.copy_(bucket.master)  # fp32 master -> compute dtype
            if bucket.shards_optimizer_state and not bucket.shards_params:
                # In place: rank i's piece is already where it belongs in the gathered buffer. Not waited for here:
                # the next forward waits for each bucket just before it needs it.
                bucket.gather_handle = all_gather(bucket.param_buffer, owned, group=bucket.group, async_op=True)
        for piece in self.pieces:
            piece.master.grad = None

    def owned_state(self, bucket):
        """The AdamW moments of the bucket's owned piece, flat (zeros where no parameter is: the padding), and the
        step count: what a checkpoint keeps."""
        flat = {kind: torch.zeros_like(bucket.master) for kind in ("exp_avg", "exp_avg_sq")}
        step = torch.zeros(())
        for piece in self.pieces:
            state = self.optimizer.state.get(piece.master)
            if piece.bucket is bucket and state:
                for kind in flat:
                    flat[kind][piece.piece] = state[kind]
                step = state["step"]
        return flat["exp_avg"], flat["exp_avg_sq"], step

    def load_owned_state(self, bucket, exp_avg, exp_avg_sq, step):
        """The inverse of owned_state: each piece's moments from the flat ones."""
        for piece in self.pieces:
            if piece.bucket is bucket:
                self.optimizer.state[piece.master] = {"step": step.clone(), "exp_avg": exp_avg[piece.piece].clone(),
                                                      "exp_avg_sq": exp_avg_sq[piece.piece].clone()}
