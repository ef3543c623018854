"""Expert parallelism (--ep_size E): each MoE layer's experts spread over E ranks of the data-parallel group.

Data parallelism gives every dp rank the whole model and its own sequences. A mixture of experts makes most of the
model experts (tiny_mixtral: 8 experts of 3 matrices in every layer), and a token uses only k of them: so the dp
ranks split the experts instead of each holding all. Consecutive dp ranks form an ep group of E ranks; rank i of
it holds experts [i * n, (i + 1) * n), n = num_local_experts / E, and everything else (attention, norms, router,
embedding, LM head) whole, as in data parallelism. Each rank still reads its own sequences.

Dispatch and combine, in every MoE layer (SparseMoeBlock.run_experts; all-to-all over the ep group):

    route       each rank's router picks k experts per token; the (token, choice) pairs are sorted by expert, so
                the pairs bound for rank j's experts are one contiguous block, itself ordered by expert
    counts      all-to-all of the counts: rank i tells rank j how many pairs it sends to each of j's experts
                (n integers per peer, one per expert of the layer in all), so every rank knows how much it will
                receive, and from whom
    dispatch    all-to-all of the tokens: rank i sends its block for rank j to rank j (hidden values, the compute
                dtype); rank j receives them source by source, regroups them expert by expert, and runs each of
                its experts once, one matmul per weight, on all the tokens that chose it, from every rank
    combine     the second all-to-all sends each output back to the rank its token came from, in the order it
                was sent; there it is put back in token order, weighted by the router and summed over the k choices

Backward runs the conjugates: the gradient of an all-to-all is the all-to-all with the counts swapped. Nothing is
dropped or padded (no capacity factor): an expert takes whatever the router sends it, so the run equals one process.

Bytes: per MoE layer and micro-batch, a rank hands to all-to-all its own (token, choice) pairs (dispatch forward,
and the gradients coming home in backward) and the pairs its experts received (combine forward, and their gradients
in backward), hidden values each, plus the counts (num_local_experts integers, 8 bytes each) once. Over an ep group
every rank's pairs are received exactly once, so per rank, on average over the group:

    bytes = 4 x tokens x k x hidden x bytes per value + 8 x num_local_experts     (tokens: batch x seq of the rank)

A rank whose experts are chosen more than their share sends more (logged as alltoall_bytes_max). The fraction
(E - 1) / E of it leaves the rank when the routing is even; the rest is pairs whose expert lives on the rank itself.

Gradients. An expert's gradient adds up the contributions of the tokens that came from every rank of its ep group
(the all-to-all's backward brings them home); ranks of other ep groups hold the same experts for other sequences.
So expert gradients are summed over the ranks that hold the same experts (the ep_dp group: dp_size / E x cp_size
ranks) and divided by dp_size x cp_size like every other gradient: zero.py gives the experts buckets of their own
over that group (at ZeRO-1/2 sharded over it). ZeRO-3 is refused with ep_size > 1: it would gather each layer's
parameters over dp x cp ranks, which hold different experts.

With other dimensions: tp ranks hold the experts whole (replicated, not sharded: an expert is small, and splitting
it would add an all-reduce to every expert on top of the all-to-all). Without sequence parallelism the tp ranks see
the same tokens and compute the same MoE layer, each in its own ep group; with it each tp rank routes its own part
of the sequence and the router's and experts' gradients are summed over the tp ranks, as a norm's are. Context
parallelism: each cp rank routes its own tokens. Pipeline parallelism: each stage's layers exchange within the ep
group of that stage. The load-balancing loss needs its statistics over the whole micro-batch: summed over cp (and
under sequence parallelism tp) ranks; over pipeline stages it is refused (moe.balance_loss).
"""
import torch
import torch.distributed as dist
import torch.nn as nn

import process_group_manager as pgm
from moe import Experts, is_moe, moe_blocks
from tensor_parallel import CopyToTensorParallelRegion

alltoall_bytes = 0  # bytes this rank handed to all-to-all (sent to itself included) since train.py last read it


def all_to_all(x, send_counts, recv_counts, group):
    """Rows [sum(send_counts), ...] out, send_counts[j] of them to rank j; [sum(recv_counts), ...] back."""
    global alltoall_bytes
    out = x.new_empty((sum(recv_counts),) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv_counts, send_counts, group=group)
    alltoall_bytes += x.numel() * x.element_size()
    return out


def alltoall_bytes_per_rank():
    """The bytes the ranks of this rank's ep group handed to all-to-all since the last call: (their mean, the most
    one rank did); then a new count from zero. A rank sends its own (token, choice) pairs and sends back the pairs its
    experts received, so one rank's bytes depend on how many tokens chose its experts; their mean is the formula's
    (module docstring) exactly."""
    global alltoall_bytes
    grid = pgm.process_group_manager
    counted, alltoall_bytes = torch.tensor([float(alltoall_bytes)], dtype=torch.float64), 0
    if grid.ep_world_size == 1:
        return counted.item(), counted.item()
    total, busiest = counted.clone(), counted.clone()
    dist.all_reduce(total, group=grid.ep_group)
    dist.all_reduce(busiest, op=dist.ReduceOp.MAX, group=grid.ep_group)
    return total.item() / grid.ep_world_size, busiest.item()


class AllToAll(torch.autograd.Function):
    """all_to_all whose backward sends each gradient back where its row came from."""

    @staticmethod
    def forward(ctx, x, send_counts, recv_counts, group):
        ctx.send_counts, ctx.recv_counts, ctx.group = send_counts, recv_counts, group
        return all_to_all(x, send_counts, recv_counts, group)

    @staticmethod
    def backward(ctx, grad):
        return all_to_all(grad, ctx.recv_counts, ctx.send_counts, ctx.group), None, None, None


class ExpertDispatch:
    """SparseMoeBlock.dispatch under expert parallelism (the module docstring's counts, dispatch and combine)."""

    def __init__(self, group, ep_size, local_experts):
        self.group, self.ep_size, self.local_experts = group, ep_size, local_experts

    def __call__(self, tokens, counts):
        """tokens [pairs, hidden] sorted by expert, counts [E] per expert. Returns (the tokens this rank's experts
        take, grouped by expert; their count per local expert; combine, which sends the experts' outputs back)."""
        sent = counts.view(self.ep_size, self.local_experts)  # [rank, its expert]: what this rank sends
        received = all_to_all(sent, [1] * self.ep_size, [1] * self.ep_size, self.group)  # [source, my expert]
        send, recv = sent.sum(dim=1).tolist(), received.sum(dim=1).tolist()
        arrived = AllToAll.apply(tokens, send, recv, self.group)  # by source rank, then by expert within each
        # regroup by expert (then source): block (source s, expert e) of the arrivals goes to place e * ep + s
        block = torch.repeat_interleave(torch.arange(received.numel(), device=counts.device), received.flatten())
        order = ((block % self.local_experts) * self.ep_size + block // self.local_experts).argsort(stable=True)

        def combine(outputs):
            back = torch.empty_like(order)
            back[order] = torch.arange(order.numel(), device=order.device)
            return AllToAll.apply(outputs[back], recv, send, self.group)  # home, in the order they were sent
        return arrived[order], received.sum(dim=0).tolist(), combine


def expert_errors(args, config):
    """Why --ep_size (and the balance loss's coefficient) cannot run with this model and layout (empty if it can)."""
    errors = []
    if not is_moe(config):
        if args.ep_size > 1:
            errors.append(f"--ep_size {args.ep_size} needs a mixture-of-experts model (config model_type "
                          f"'mixtral'): {args.model_name} is dense (try --model_name assets/tiny_mixtral)")
        if args.router_aux_loss_coef is not None:
            errors.append("--router_aux_loss_coef needs a mixture-of-experts model: a dense model has no router")
        return errors
    if config.num_local_experts % args.ep_size:
        errors.append(f"num_local_experts {config.num_local_experts} is not divisible by --ep_size {args.ep_size}: "
                      f"every rank of an ep group holds the same number of experts")
    if args.dp_size % args.ep_size:
        errors.append(f"--ep_size {args.ep_size} does not divide dp_size {args.dp_size}: the experts are spread over "
                      f"groups of ep_size data-parallel ranks")
    if args.ep_size > 1 and args.zero_stage == 3:
        errors.append("--zero_stage 3 with --ep_size > 1: ZeRO-3 gathers each layer's parameters from all dp x cp "
                      "ranks, which hold different experts; use --zero_stage 2 (the experts' own buckets are sharded)")
    if args.pp_size > 1 and config.router_aux_loss_coef:
        errors.append(f"--pp_size {args.pp_size} with router_aux_loss_coef {config.router_aux_loss_coef}: the "
                      f"load-balancing loss multiplies statistics summed over every layer, which pipeline stages "
                      f"hold apart; pass --router_aux_loss_coef 0")
    return errors


def apply_expert_parallel(model, sequence_parallel):
    """Cut every MoE layer's experts to this rank's share and send its tokens over the ep group (nothing to cut at
    ep_size 1); tell the balance loss which ranks share a micro-batch's tokens, and under sequence parallelism sum
    the router's and experts' gradients over the tp ranks. Returns the model."""
    grid = pgm.process_group_manager
    for block in moe_blocks(model):
        if grid.ep_world_size > 1:
            experts = block.experts
            count = block.num_experts // grid.ep_world_size
            experts.first = grid.ep_rank * count
            for name in ("gate_up_proj", "down_proj"):
                full = getattr(experts, name)
                setattr(experts, name, nn.Parameter(full[experts.first:experts.first + count]))
            block.dispatch = ExpertDispatch(grid.ep_group, grid.ep_world_size, count)
        if sequence_parallel:
            block.experts.shared = CopyToTensorParallelRegion.apply
        block.token_group = [group for group, size in ((grid.cp_group, grid.cp_world_size),
                                                       (grid.tp_group, grid.tp_world_size if sequence_parallel else 1))
                             if size > 1]
        block.balance_scale = grid.cp_world_size
    return model


def expert_placement(module):
    """{parameter: (its first element in the full tensor, the full tensor's shape)} for each expert tensor of which
    this rank holds a part (every expert: empty). A rank's experts are consecutive along dimension 0, so its part is
    one range of the flattened full tensor: checkpoints save and read it there, in the full tensor's coordinates."""
    placement = {}
    for experts in module.modules():
        if isinstance(experts, Experts) and experts.gate_up_proj.shape[0] < experts.num_experts:
            for param in (experts.gate_up_proj, experts.down_proj):
                per_expert = param[0].numel()
                placement[param] = (experts.first * per_expert, (experts.num_experts, *param.shape[1:]))
    return placement


def expert_parameters(module):
    """The parameters that differ between the ranks of an ep group: their gradients reduce over the ep_dp group."""
    return list(expert_placement(module))
