"""The optimizer as large runs set it up (nanoGPT, Megatron-LM, torchtitan): AdamW whose weight decay touches the
matrices only, a learning rate that warms up linearly and then follows a cosine down to 10% of its peak, and the
gradients clipped by their global L2 norm before every step."""
import functools
import math

import torch
import torch.distributed as dist

import process_group_manager as pgm
from tensor_parallel import tp_sharded_parameters
from utils import warn

MIN_LR_FRACTION = 0.1  # the cosine ends at this fraction of --learning_rate, on the run's last step


def decays(param):
    """Tensors of two or more dimensions (the embedding, every linear weight) decay; 1-D tensors (the norms' weights,
    any bias) do not: pulling a gain towards zero only fights the normalisation."""
    return param.dim() >= 2


def decay_groups(params, weight_decay):
    """AdamW's two parameter groups: with weight decay, and without."""
    params = [p for p in params if p.requires_grad]
    return [{"params": [p for p in params if decays(p)], "weight_decay": weight_decay},
            {"params": [p for p in params if not decays(p)], "weight_decay": 0.0}]


def lr_factor(step_index, *, schedule, warmup_steps, total_steps):
    """The learning rate of optimizer step step_index + 1, as a fraction of the peak: step / warmup_steps during
    the warm-up, then 1 (constant) or a cosine from 1 down to MIN_LR_FRACTION at step total_steps (cosine)."""
    step = step_index + 1  # LambdaLR counts from 0; the log counts optimizer steps from 1
    if step <= warmup_steps:
        return step / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(total_steps - warmup_steps, 1)  # (0, 1] after the warm-up
    return MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def resolve_warmup_steps(warmup_steps, total_steps):
    """--warmup_steps, by default a tenth of the run. A warm-up longer than the run is allowed (a short try of a
    long run's settings), but said: the learning rate then never reaches its peak."""
    if warmup_steps is None:
        return total_steps // 10
    if warmup_steps > total_steps:
        warn(f"--warmup_steps {warmup_steps} is beyond the run's last step {total_steps}: the learning rate only "
             f"rises, to {total_steps / warmup_steps:.0%} of --learning_rate")
    return warmup_steps


def lr_scheduler(optimizer, schedule, warmup_steps, total_steps, steps_done=0):
    """torch's LambdaLR with lr_factor: scheduler.step() after each optimizer step moves to the next step's rate.
    A resumed run starts it at the checkpoint's step (steps_done): the schedule's position is the step count."""
    factor = functools.partial(lr_factor, schedule=schedule, warmup_steps=warmup_steps, total_steps=total_steps)
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])  # the peak: LambdaLR asks for it when it starts mid-schedule
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=steps_done - 1)


def sum_of_squares(grads, device):
    """The sum of the squared elements of every tensor, added up in fp64: the fp32 norm taken from it is then the
    same however the elements are cut into tensors, shards and pieces, and in whatever order they are added, so
    every layout clips by the same factor (to the last bit, but for a sum that lands on a rounding boundary)."""
    return sum((grad.float().pow(2).sum(dtype=torch.float64) for grad in grads),
               torch.zeros((), dtype=torch.float64, device=device))


def clip_grad_norm(model, max_norm):
    """The global L2 norm of all the model's gradients, before clipping (a 0-dim tensor: reading it is the caller's
    host sync), and, when max_norm > 0, every gradient scaled by max_norm / (norm + 1e-6) if that is below 1: the
    rule of torch.nn.utils.clip_grad_norm_. Every rank must find the norm of the whole model's gradient, each element
    counted once, or the ranks would clip differently."""
    grid = pgm.process_group_manager
    params = [p for p in model.parameters() if p.grad is not None]
    grads = [p.grad for p in params]
    # Data and context parallel: after the averaging, the ranks of a dp x cp group hold the same gradients:
    # nothing to add over them.
    # Tensor parallel: each rank adds the squares of its shards, and the sum runs over the tp group; a tensor that
    # every tp rank holds whole (a norm's weight) is counted by tp rank 0 only.
    sharded = tp_sharded_parameters(model)
    squares = sum_of_squares([p.grad for p in params if p in sharded or grid.tp_rank == 0], grads[0].device)
    if grid.tp_world_size > 1:
        dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=grid.tp_group)
    # Pipeline parallel: each stage holds its own layers, so the stages' squares add up.
    if grid.pp_world_size > 1:
        dist.all_reduce(squares, op=dist.ReduceOp.SUM, group=grid.pp_group)
    norm = squares.sqrt().float()
    if max_norm > 0:
        scale = (max_norm / (norm + 1e-6)).clamp(max=1.0)
        for grad in grads:
            grad.mul_(scale)
    return norm
