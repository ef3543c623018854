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

Three files: this one wraps the model (ZeroDataParallel, the stage's hooks), sharded_bucket.py holds one
bucket's flat buffers and its collectives, zero_optimizer.py the optimizer (ZeroAdamW).

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
import torch.nn as nn

import process_group_manager as pgm
from expert_parallel import expert_parameters
from sharded_bucket import MAX_REDUCTIONS_IN_FLIGHT, ShardedBucket, group_into_buckets

ZERO_STAGES = (0, 1, 2, 3)


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
        # The schedules of step 14 (interleaved chunks, zb_h1's deferred W) interleave the gradients of different
        # micro-batches in one bucket: with defer_reduction set, gradients only accumulate, and reduce_gradients()
        # reduces every bucket once, after the step's last pass (stages 2 and 3 then keep whole fp32 buffers
        # through the step, as stage 1 does).
        self.defer_reduction = False
        grid = pgm.process_group_manager
        group = grid.cp_dp_group if grid.cp_dp_world_size > 1 else None
        params = [p for p in module.parameters() if p.requires_grad]
        if self.stage.shards_parameters:  # a bucket per unit, in forward order
            units = decoder_units(module)
            groups = [list(dict.fromkeys(p for m in unit for p in m.parameters() if p.requires_grad)) for unit in units]
            if sum(len(g) for g in groups) != len(params):
                raise ValueError("ZeRO-3 gathers the embedding, the decoder layers and the final norm with the LM "
                                 "head; this model has parameters outside them")
            self.buckets = [ShardedBucket(bucket_params, self.stage, group, device) for bucket_params in groups]
        else:
            # Expert parallelism (step 15): the experts a rank holds get buckets of their own, reduced over the
            # ranks that hold the same experts (ep_dp) and divided by dp x cp like the rest: the tokens of every
            # rank of the ep group reached them (see expert_parallel.py)
            held = set(expert_parameters(module))
            experts = [p for p in params[::-1] if p in held]
            self.buckets = [ShardedBucket(bucket_params, self.stage, group, device) for bucket_params in
                            group_into_buckets([p for p in params[::-1] if p not in held], bucket_size_mb)]
            expert_group = grid.ep_dp_group if grid.ep_dp_world_size > 1 else None
            self.buckets += [ShardedBucket(bucket_params, self.stage, expert_group, device,
                                           average_over=grid.cp_dp_world_size)
                             for bucket_params in (group_into_buckets(experts, bucket_size_mb) if experts else [])]
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
        if self.defer_reduction and self.gathered_for_backward[index] and args and args[0].requires_grad:
            # no count of gradients tells when a unit's backward is over: the gradient of its input does
            args[0].register_hook(lambda grad: self.buckets[index].free_parameters())
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
        if self.defer_reduction:
            if param.grad is None:  # zb_h1's B: a linear's weight gradient waits for its W
                return
            if bucket.grad_buffer is None:  # stages 2, 3: freed by the previous step's reduction
                bucket.allocate_grad_buffer()
            param.main_grad.add_(param.grad)
            param.grad = None
            return
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

    def reduce_gradients(self):
        """With defer_reduction: start every bucket's reduction, once the step's gradients are complete."""
        for bucket in self.buckets:
            if bucket.grad_buffer is not None:
                bucket.start_reduction()
                self.in_flight.append(bucket)

    def finish_gradient_synchronization(self):
        """Wait for every bucket's reduction; then each rank holds the averaged gradient of the piece it owns."""
        for bucket in self.in_flight:
            bucket.finish_reduction()
        self.in_flight = []
        for bucket in self.buckets:
            if bucket.average_over > 1:
                bucket.owned_grad().div_(bucket.average_over)  # gloo has no ReduceOp.AVG: the reductions summed
        for bucket in self.buckets:
            if bucket.grad_buffer is not None and bucket.num_ready:
                names = ", ".join(str(tuple(p.shape)) for p in bucket.params)
                raise RuntimeError(f"a gradient bucket was never reduced: some of its parameters ({names}) got no "
                                   f"gradient in the last backward (unused parameters are not supported)")

    def zero_grad(self, set_to_none=True):
        super().zero_grad(set_to_none)
        for bucket in self.buckets:
            bucket.reset()
