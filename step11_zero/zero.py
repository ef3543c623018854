"""Mixed precision with an fp32 master, and ZeRO-1/2: the optimizer state and the gradients sharded over
the ranks that hold the same weights (Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training
Trillion Parameter Models").

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

ZERO_STAGES = (0, 1, 2)
# ZeRO-2: a bucket's full fp32 gradient buffer lives while backward fills it and while it is being reduced;
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
    gradients too."""
    shards_optimizer_state: bool  # stages 1, 2: each rank keeps and updates the AdamW state of its piece only
    shards_gradients: bool  # stage 2: each micro-batch reduce-scatters, and only the owned piece is kept

    @classmethod
    def of(cls, zero_stage):
        return cls(shards_optimizer_state=zero_stage >= 1, shards_gradients=zero_stage >= 2)


class ShardedBucket:
    """Parameters whose values share one flat buffer of the compute dtype, and whose gradients share one flat
    fp32 buffer; both cut into N pieces, one owned by each rank of the dp x cp group."""

    def __init__(self, params, stage, group):
        self.params = params
        self.stage = stage
        self.group = group
        self.num_ranks = dist.get_world_size(group) if group is not None else 1
        rank = dist.get_rank(group) if group is not None else 0
        numel = sum(p.numel() for p in params)
        self.padded_numel = -(-numel // self.num_ranks) * self.num_ranks  # a multiple of N
        piece = self.padded_numel // self.num_ranks
        # Stage 0 updates the whole bucket on every rank; stages 1 and 2 only rank i's piece.
        sharded = stage.shards_optimizer_state
        self.owned = slice(rank * piece, (rank + 1) * piece) if sharded else slice(0, self.padded_numel)
        self.shards_optimizer_state = sharded and self.num_ranks > 1  # each rank owns its own piece
        first = params[0]
        self.param_buffer = torch.zeros(self.padded_numel, dtype=first.dtype, device=first.device)
        self.offsets = []  # each parameter's place in the flat buffers
        offset = 0
        for param in params:
            self.param_buffer[offset:offset + param.numel()].copy_(param.detach().reshape(-1))
            param.data = self.param_buffer[offset:offset + param.numel()].view_as(param)
            self.offsets.append(offset)
            offset += param.numel()
        # fp32: the master is the parameter itself; otherwise an fp32 copy of the owned piece.
        self.master_is_param = first.dtype == torch.float32
        self.master = self.param_buffer[self.owned] if self.master_is_param else self.param_buffer[self.owned].float()
        self.gather_handle = None  # the all-gather of the updated parameters, from ZeroAdamW.step to the next forward
        self.grad_buffer = None  # [padded_numel] fp32
        # ZeRO-2 keeps only the owned piece of the gradient between micro-batches; the others use grad_buffer's.
        self.grad_shard = torch.zeros_like(self.master) if stage.shards_gradients else None
        self.num_ready = 0
        self.handle = None
        if not stage.shards_gradients:
            self.allocate_grad_buffer()

    def finish_gather(self):
        """Wait for the all-gather of the updated parameters that ZeroAdamW.step started (if it is in flight)."""
        if self.gather_handle is not None:
            self.gather_handle.wait()
            self.gather_handle = None

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
        """Wait for the bucket's reduction; at stage 2 add the owned piece to the shard and free the buffer."""
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


class ZeroDataParallel(nn.Module):
    """Data parallelism over the dp x cp group whose gradients end up sharded (stages 1, 2) or whole (stage 0)
    in fp32; at dp x cp = 1 it is the fp32 gradient accumulator that mixed precision needs."""

    def __init__(self, module, zero_stage=0, bucket_size_mb=25):
        super().__init__()
        self.module = module
        self.zero_stage = zero_stage
        self.stage = ZeroStage.of(zero_stage)
        # False during the gradient-accumulation micro-batches of stages 0 and 1: their gradients only accumulate
        # locally. Stage 2 reduces every micro-batch, so that only the owned piece is kept between them.
        self.require_backward_grad_sync = True
        grid = pgm.process_group_manager
        group = grid.cp_dp_group if grid.cp_dp_world_size > 1 else None
        params = [p for p in module.parameters() if p.requires_grad]
        self.buckets = [ShardedBucket(bucket_params, self.stage, group)
                        for bucket_params in group_into_buckets(params[::-1], bucket_size_mb)]
        self.in_flight = []  # buckets whose reduction was started and not yet waited for, oldest first
        for bucket in self.buckets:
            for param in bucket.params:
                param.register_post_accumulate_grad_hook(functools.partial(self._gradient_ready, bucket))
        if self.stage.shards_optimizer_state and group is not None:
            # ZeRO-1/2: ZeroAdamW.step all-gathers the updated parameters without waiting; each module waits for the
            # buckets of its own parameters just before its forward (Megatron's overlapped parameter gather), so
            # the gathers of the later buckets run while the first layers compute.
            bucket_of = {param: bucket for bucket in self.buckets for param in bucket.params}
            for submodule in module.modules():
                buckets = {bucket_of[p] for p in submodule.parameters(recurse=False) if p in bucket_of}
                if buckets:
                    submodule.register_forward_pre_hook(functools.partial(self._wait_for_gathers, list(buckets)))

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def _wait_for_gathers(self, buckets, module, args):
        for bucket in buckets:
            bucket.finish_gather()

    def finish_parameter_gathers(self):
        """Wait for every all-gather of updated parameters still in flight: before the parameters are read other
        than by a forward (a checkpoint, a comparison) and before the process group goes."""
        for bucket in self.buckets:
            bucket.finish_gather()

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
    (waited for by the next forward, bucket by bucket)."""

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
            owned = bucket.param_buffer[bucket.owned]
            if not bucket.master_is_param:
                owned.copy_(bucket.master)  # fp32 master -> compute dtype
            if bucket.shards_optimizer_state:
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
