"""Data parallelism, the naive way: every data-parallel rank holds the whole model, runs its own share
of the global batch, and all-reduces each parameter's gradient over the data-parallel group as soon
as backward has produced it, so that every rank steps with the gradient of the whole global batch.

    model = DataParallelNaive(model)
    for i in range(grad_acc_steps):
        model.require_backward_grad_sync = i == grad_acc_steps - 1  # communicate on the last one only
        loss = ...; loss.backward()
    optimizer.step()

One blocking all-reduce per parameter: communication does not overlap the rest of backward, and
many small messages pay the latency of many calls. Step 6 fixes both with buckets.

DataParallelBucket (step 6) computes the same averaged gradients with the communication
overlapped and batched. What changes from the naive version:
- Parameters are grouped into buckets of about bucket_size_mb; each bucket's gradients live side
  by side in one flat fp32 buffer (`param.main_grad` is a view into it), so one all-reduce per
  bucket replaces one per parameter: fewer, larger messages.
- A bucket's all-reduce is launched asynchronously as soon as its last gradient is ready, and runs
  while backward goes on computing the gradients of earlier layers. Buckets are filled in reverse
  registration order because backward produces gradients roughly in reverse layer order.
- Micro-batches accumulate into the fp32 buffers, so low-precision (bf16) training still sums the
  micro-batches in fp32.

    model = DataParallelBucket(model, bucket_size_mb=25)
    model.zero_grad()  # also empties the buckets
    for i in range(grad_acc_steps):
        model.require_backward_grad_sync = i == grad_acc_steps - 1  # communicate on the last one only
        loss = ...; loss.backward()
    model.finish_gradient_synchronization()  # wait; param.grad = the global batch's mean gradient
    optimizer.step()
"""
import functools

import torch
import torch.distributed as dist
import torch.nn as nn

import process_group_manager as pgm


class DataParallelNaive(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module
        # False during the gradient-accumulation micro-batches: their gradients only accumulate locally.
        self.require_backward_grad_sync = True
        for param in self.module.parameters():
            if param.requires_grad:
                # Why a *post-accumulate* hook and not `param.register_hook`: a tensor hook sees only the
                # gradient of the current backward, before it is added to param.grad. All-reducing that
                # one on the last micro-batch would average only the last micro-batch's gradient, while
                # the earlier micro-batches' contributions, already sitting in param.grad, stay local:
                # ranks would step with different gradients. This hook runs after the addition, so it
                # reduces param.grad, the sum over every micro-batch.
                param.register_post_accumulate_grad_hook(self._all_reduce_gradient)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def _all_reduce_gradient(self, param):
        if not self.require_backward_grad_sync:
            return
        grid = pgm.process_group_manager
        # gloo has no ReduceOp.AVG: sum over the data-parallel ranks, then divide.
        dist.all_reduce(param.grad, op=dist.ReduceOp.SUM, group=grid.dp_group)
        param.grad /= grid.dp_world_size


class Bucket:
    """Parameters whose gradients share one flat fp32 buffer and are all-reduced together."""

    def __init__(self, params, device):
        self.params = params
        self.grad_buffer = torch.zeros(sum(p.numel() for p in params), dtype=torch.float32, device=device)
        offset = 0
        for param in params:
            param.main_grad = self.grad_buffer[offset:offset + param.numel()].view_as(param)
            offset += param.numel()
        self.num_ready = 0
        self.handle = None

    def mark_ready(self):
        """One more parameter has its final gradient for this step; the last one starts the all-reduce."""
        self.num_ready += 1
        if self.num_ready == len(self.params):
            # async_op: returns at once, so backward carries on while the bucket is being reduced.
            self.handle = dist.all_reduce(self.grad_buffer, op=dist.ReduceOp.SUM,
                                          group=pgm.process_group_manager.dp_group, async_op=True)

    def wait(self):
        if self.handle is None:
            names = ", ".join(str(tuple(p.shape)) for p in self.params)
            raise RuntimeError(f"a gradient bucket was never all-reduced: some of its parameters ({names}) got "
                               f"no gradient in the last backward (unused parameters are not supported)")
        self.handle.wait()
        # gloo has no ReduceOp.AVG: sum over the data-parallel ranks, then divide.
        self.grad_buffer /= pgm.process_group_manager.dp_world_size

    def reset(self):
        self.grad_buffer.zero_()
        self.num_ready = 0
        self.handle = None


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


class DataParallelBucket(nn.Module):
    def __init__(self, module, bucket_size_mb=25):
        super().__init__()
        self.module = module
        # False during the gradient-accumulation micro-batches: their gradients only accumulate locally.
        self.require_backward_grad_sync = True
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.buckets = [Bucket(params, self.params[0].device)
                        for params in group_into_buckets(self.params[::-1], bucket_size_mb)]
        for bucket in self.buckets:
            for param in bucket.params:
                # Post-accumulate: runs once param.grad holds this backward's full gradient of the parameter.
                param.register_post_accumulate_grad_hook(functools.partial(self._gradient_ready, bucket))

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def _gradient_ready(self, bucket, param):
        # Move the gradient into the bucket, where micro-batches accumulate; autograd allocates a fresh
        # param.grad next backward. On the last micro-batch main_grad is then the sum over all of them.
        param.main_grad.add_(param.grad)
        param.grad = None
        if self.require_backward_grad_sync:
            bucket.mark_ready()

    def finish_gradient_synchronization(self):
        """Wait for every bucket's all-reduce, then give the optimizer the averaged gradients as param.grad
        (fp32 parameters share the bucket memory; lower-precision ones get a cast copy)."""
        for bucket in self.buckets:
            bucket.wait()
        for param in self.params:
            param.grad = param.main_grad.to(param.dtype)

    def zero_grad(self, set_to_none=True):
        super().zero_grad(set_to_none)
        for bucket in self.buckets:
            bucket.reset()
