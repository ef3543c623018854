"""One bucket of ZeRO (see zero.py): its parameters' values in one flat buffer of the compute dtype and their
fp32 gradients in another, both cut into one piece per rank of the dp x cp group, and the collectives that
fill them: the reduction of the gradients when the last of them is ready, the all-gather of the updated
pieces after the optimizer step, and ZeRO-3's gather of a unit's parameters before its compute and the
freeing after it.
"""
import torch
import torch.distributed as dist
import torch.nn as nn

from process_group_manager import all_gather, reduce_scatter

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


class ShardedBucket:
    """Parameters whose values share one flat buffer of the compute dtype, and whose gradients share one flat
    fp32 buffer; both cut into N pieces, one owned by each rank of the dp x cp group. Under ZeRO-3 a bucket is
    one unit (a decoder layer, say), and its parameter buffer has memory only while the unit is gathered."""

    def __init__(self, params, stage, group, device=None, average_over=None):
        """average_over: the gradients' divisor once summed over the group (default its size; experts: dp x cp)."""
        self.params = params
        self.stage = stage
        self.group = group
        self.num_ranks = dist.get_world_size(group) if group is not None else 1
        self.average_over = self.num_ranks if average_over is None else average_over
        self.holds_experts = average_over is not None  # expert parallelism: what this rank holds, not every rank
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

    def publish_update(self):
        """After AdamW: the fp32 master cast into the owned piece of the compute parameters, and (stages 1, 2) the
        all-gather that brings every rank's updated piece started. In place: rank i's piece is already where it
        belongs in the gathered buffer. Not waited for here: the next forward waits just before it needs it. At
        stage 3 the piece is all there is until the next forward gathers the unit."""
        if not self.master_is_param:
            self.param_shard.copy_(self.master)  # fp32 master -> compute dtype
        if self.shards_optimizer_state and not self.shards_params:
            self.gather_handle = all_gather(self.param_buffer, self.param_shard, group=self.group, async_op=True)

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
        self.start_reduction()
        return True

    def start_reduction(self):
        """Sum the bucket's gradients over the ranks (stage 0: all-reduce; 1 to 3: reduce-scatter), not waited for."""
        if self.num_ranks == 1:
            self.handle = None
        elif not self.stage.shards_optimizer_state:
            self.handle = dist.all_reduce(self.grad_buffer, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        else:
            # In place: the sum of rank i's piece over the N ranks lands in rank i's piece of grad_buffer.
            self.handle = reduce_scatter(self.grad_buffer[self.owned], self.grad_buffer, op=dist.ReduceOp.SUM,
                                         group=self.group, async_op=True)

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
