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
"""
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
