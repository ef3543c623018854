"""Four classic mistakes of distributed training, each a few lines long, to see what they do on a laptop
(README.md, "Debugging a distributed run"). Run one with 2 processes; --fixed runs the corrected line:

    torchrun --nproc_per_node 2 tools/distributed_mistakes.py skip_collective        # hangs
    torchrun --nproc_per_node 2 tools/distributed_mistakes.py mismatched_shapes      # garbage, then an abort
    torchrun --nproc_per_node 2 tools/distributed_mistakes.py last_micro_batch_sync  # replicas drift apart
    torchrun --nproc_per_node 2 tools/distributed_mistakes.py seed_per_rank          # replicas start apart

Every rank prints what it sees. The line with the mistake is marked `# MISTAKE`.
"""
import argparse
import os

import torch
import torch.distributed as dist

MISTAKES = ("skip_collective", "mismatched_shapes", "last_micro_batch_sync", "seed_per_rank")


def say(message):
    # One write per line: the ranks share the terminal, and print's separate newline write could interleave.
    print(f"[rank {dist.get_rank()}] {message}\n", end="", flush=True)


def skip_collective(fixed):
    """Only the logging rank prints the loss, and the all-reduce that averages it went inside the same `if`.
    Rank 0 waits in the all-reduce for a partner that never comes; rank 1 goes on and waits at the next
    collective, a barrier. Nothing fails: the job hangs (gloo's default timeout is 30 minutes)."""
    loss = torch.tensor([1.0 + dist.get_rank()])
    say("before the loss all-reduce")
    if fixed:
        dist.all_reduce(loss)  # every rank takes part; only the printing is rank 0's
    if dist.get_rank() == 0:
        if not fixed:
            dist.all_reduce(loss)  # MISTAKE: a collective that only some ranks reach
        say(f"mean loss {loss.item() / dist.get_world_size()}")
    dist.barrier()  # e.g. before a checkpoint is marked complete
    say("after the barrier")


def mismatched_shapes(fixed):
    """Two pipeline stages: stage 0 sends activations [micro_batch, seq, hidden] forward, stage 1 sends their
    gradient back. Each side allocates its receive buffer from its own idea of the shape, and stage 1 uses
    another seq_len. Forward, its buffer is larger than the message: the receive succeeds and leaves the
    rest of the buffer unwritten. Backward, the message is larger than stage 0's buffer: gloo aborts stage 0."""
    micro_batch, hidden, seq_len = 2, 4, 8
    if dist.get_rank() == 0:
        dist.send(torch.ones(micro_batch, seq_len, hidden), dst=1)
        grad = torch.full((micro_batch, seq_len, hidden), float("nan"))  # nan: a value that was never written
        dist.recv(grad, src=1)  # gloo aborts this process here when the message is larger than the buffer
        say(f"received a gradient {tuple(grad.shape)}; {grad.isnan().sum().item()} values never written")
    else:
        stage_seq_len = seq_len if fixed else 2 * seq_len  # MISTAKE: this stage disagrees on the shape
        activations = torch.full((micro_batch, stage_seq_len, hidden), float("nan"))
        dist.recv(activations, src=0)
        say(f"received activations {tuple(activations.shape)} without an error; "
            f"{activations.isnan().sum().item()} of {activations.numel()} values were never written")
        dist.send(torch.ones(micro_batch, stage_seq_len, hidden), dst=0)


def micro_batches(rank, grad_acc_steps):
    """This rank's share of the global batch: grad_acc_steps micro-batches of (inputs [2, 8], targets [2, 1])."""
    generator = torch.Generator().manual_seed(1000 + rank)
    return [(torch.randn(2, 8, generator=generator), torch.randn(2, 1, generator=generator))
            for _ in range(grad_acc_steps)]


def max_difference_across_ranks(tensor):
    gathered = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.detach().contiguous())
    return max((t - gathered[0]).abs().max().item() for t in gathered)


def last_micro_batch_sync(fixed):
    """Data parallel with 2 micro-batches of gradient accumulation, the gradient synchronised in the last
    micro-batch's backward. A tensor hook (param.register_hook) sees only that backward's gradient, before it
    is added to param.grad: it averages the last micro-batch's gradient, while the first one's stays local.
    The post-accumulate hook (what step 5 uses) averages param.grad, the sum over both micro-batches."""
    world_size, grad_acc_steps = dist.get_world_size(), 2
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    sync = {"now": False}

    def average(grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad / world_size

    def average_accumulated(param):
        if sync["now"]:
            param.grad = average(param.grad)

    for param in model.parameters():
        if fixed:
            param.register_post_accumulate_grad_hook(average_accumulated)
        else:
            param.register_hook(lambda grad: average(grad) if sync["now"] else grad)  # MISTAKE: sees one backward
    for i, (inputs, targets) in enumerate(micro_batches(dist.get_rank(), grad_acc_steps)):
        sync["now"] = i == grad_acc_steps - 1
        loss = torch.nn.functional.mse_loss(model(inputs), targets) / grad_acc_steps
        loss.backward()

    # The gradient every rank should hold: that of the mean loss over all ranks' micro-batches.
    reference = torch.nn.Linear(8, 1)
    reference.load_state_dict(model.state_dict())
    for rank in range(world_size):
        for inputs, targets in micro_batches(rank, grad_acc_steps):
            (torch.nn.functional.mse_loss(reference(inputs), targets) / (grad_acc_steps * world_size)).backward()
    grad_error = (model.weight.grad - reference.weight.grad).abs().max().item()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    say(f"|gradient - global batch gradient| = {grad_error:.2e}; after one optimizer step the ranks' weights "
        f"differ by {max_difference_across_ranks(model.weight):.2e}")


def seed_per_rank(fixed):
    """Every rank builds the full model from the seed, then keeps its shard or stage: that is what makes the
    shards fit together and the replicas identical. Seeding with seed + rank (a habit from data loading) gives
    every rank a different model. Nothing fails: the step-1 loss is simply not the single-process one."""
    seed = 42
    torch.manual_seed(seed if fixed else seed + dist.get_rank())  # MISTAKE: the seed depends on the rank
    model = torch.nn.Linear(8, 8)
    say(f"the ranks' initial weights differ by {max_difference_across_ranks(model.weight):.2e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mistake", choices=MISTAKES)
    parser.add_argument("--fixed", action="store_true", help="run the corrected version")
    args = parser.parse_args()
    if "RANK" not in os.environ:
        parser.error("run it under torchrun: torchrun --nproc_per_node 2 tools/distributed_mistakes.py MISTAKE")
    dist.init_process_group("gloo")
    globals()[args.mistake](args.fixed)
    dist.barrier()  # no rank tears its connections down while another still uses them
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
