"""Pipeline parallelism: each pipeline stage holds a contiguous slice of the layers, and micro-batches
flow through the stages: activations forward to the next stage, their gradients backward to the
previous one.

    stage 0: embed_tokens + layers[0:k]  ->  stage 1: layers[k:m]  ->  ...  ->  last stage: layers[..] + norm + lm_head

The AFAB schedule (all forward, all backward) runs every micro-batch's forward, then every
micro-batch's backward, so each stage holds the activations of all grad_acc_steps micro-batches at once.
The 1F1B schedule (one forward, one backward) starts each micro-batch's backward as soon as the pipeline
is full, so stage r holds at most pp_size - r micro-batches, however large grad_acc_steps is.

Step 14 adds two schedules that shrink the bubble, run from tables (pipeline_schedules.py, scheduled_pipeline.py):
interleaved 1F1B, for which a stage holds virtual_pp_size chunks of layers (PipelineParallel below), and zero bubble
(zb_h1), which splits each linear's backward in two (zero_bubble.py).

Tied embeddings are refused when pp_size > 1 (validate_layout): the shared weight would live on two
stages and need its own gradient all-reduce between them.

VERBOSE=1 prints every send/recv (rank, direction, peer, shape) so the schedule can be followed.
PIPELINE_TIMELINE=DIR records when each stage ran each forward and backward (tools/pipeline_timeline.py draws it).
PIPELINE_PASS_SECONDS=T makes every pass last T seconds per unit (a forward, B or W is one unit, a whole backward
two), waiting out what its compute leaves: the schedule's shape, apart from this machine (tools/pipeline_bubble.py).
"""
import functools
import json
import os
import time
from collections import deque

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import process_group_manager as pgm
from model import rotary_cos_sin


def log(message):
    if os.environ.get("VERBOSE", "0") == "1":  # read at every call: nothing is read at import
        grid = pgm.process_group_manager
        # One write per line: ranks share the terminal, and print's separate newline write could interleave.
        print(f"[rank {grid.global_rank} | stage {grid.pp_rank}/{grid.pp_world_size}] {message}\n", end="", flush=True)


def now():
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()  # on a GPU: when the kernels ran, not when they were queued
    return time.time()  # one clock for every process on the machine


def timeline(kind, units=1):
    """Decorator: with PIPELINE_TIMELINE=DIR set when a call runs, it appends {"stage", "kind", "start", "end"} to
    DIR/rank_<global rank>.jsonl; with PIPELINE_PASS_SECONDS=T the call lasts units * T seconds. Unset, the call
    costs a look at the environment."""
    def decorate(function):
        @functools.wraps(function)  # timed.__wrapped__: the undecorated function
        def timed(*args, **kwargs):
            timeline_dir, pass_seconds = os.environ.get("PIPELINE_TIMELINE"), os.environ.get("PIPELINE_PASS_SECONDS")
            if not timeline_dir and not pass_seconds:
                return function(*args, **kwargs)
            start = now()
            result = function(*args, **kwargs)
            if pass_seconds:
                time.sleep(max(0.0, start + units * float(pass_seconds) - now()))
            end = now()
            if not timeline_dir:
                return result
            grid = pgm.process_group_manager
            with open(os.path.join(timeline_dir, f"rank_{grid.global_rank}.jsonl"), "a") as file:
                file.write(json.dumps({"stage": grid.pp_rank, "kind": kind, "start": start, "end": end}) + "\n")
            return result
        return timed
    return decorate


def stage_layer_range(num_layers, pp_size, pp_rank):
    """Layers [start, end) of stage pp_rank: num_layers // pp_size each, and the first
    num_layers % pp_size stages take one more (the last stage already carries norm and lm_head)."""
    base, extra = divmod(num_layers, pp_size)
    start = pp_rank * base + min(pp_rank, extra)
    return start, start + base + (1 if pp_rank < extra else 0)


def global_name(local_name, layer_ids=None):
    """A rank's parameter name -> its name in the full model: without the data-parallel wrapper's `module.`,
    with the global index of a stage's layer (layer_ids[i]: the global index of the stage's layers.i;
    `module.layers.1.mlp.up_proj.weight` on a stage whose layers are 2, 3 -> `layers.3.mlp.up_proj.weight`)."""
    name = local_name.removeprefix("module.")
    if name.startswith("layers.") and layer_ids is not None:
        _, index, rest = name.split(".", 2)
        name = f"layers.{layer_ids[int(index)]}.{rest}"
    return name


class PipelineParallel(nn.Module):
    """This stage's part of a full Llama, built on the meta device: weights.py then fills in this stage's
    weights from the seed stream, so the stages together hold exactly the single-process weights.

    With virtual_pp_size v the layers are cut into pp_size * v chunks and this stage holds chunks pp_rank,
    pp_rank + pp_size, ... (interleaved 1F1B); forward(..., chunk=c) runs its c-th. The embedding belongs to the first
    chunk of stage 0, the final norm and the LM head to the last chunk of the last stage."""

    def __init__(self, model, config, virtual_pp_size=1):
        super().__init__()
        grid = pgm.process_group_manager
        chunks = [stage_layer_range(config.num_hidden_layers, grid.pp_world_size * virtual_pp_size,
                                    chunk * grid.pp_world_size + grid.pp_rank) for chunk in range(virtual_pp_size)]
        self.layer_ids = [layer for start, end in chunks for layer in range(start, end)]  # global index of layers.i
        ends = [end - start for start, end in chunks]
        self.chunk_layers = [range(sum(ends[:c]), sum(ends[:c + 1])) for c in range(virtual_pp_size)]  # local
        self.head_dim, self.rope_theta = model.head_dim, model.rope_theta
        self.embed_tokens = model.embed_tokens if grid.pp_is_first_stage else None
        self.layers = nn.ModuleList(model.layers[layer] for layer in self.layer_ids)
        self.norm = model.norm if grid.pp_is_last_stage else None
        self.lm_head = model.lm_head if grid.pp_is_last_stage else None

    def forward(self, input_ids, position_ids, hidden_states, *, chunk=0):
        # The first stage embeds the tokens; the others continue from the previous stage's output.
        first, last = chunk == 0, chunk == len(self.chunk_layers) - 1
        x = self.embed_tokens(input_ids) if first and self.embed_tokens is not None else hidden_states
        # Rotary angles depend only on the (global) positions, so every stage recomputes them locally.
        cos, sin = rotary_cos_sin(position_ids, self.head_dim, self.rope_theta, x.dtype)
        for index in self.chunk_layers[chunk]:
            x = self.layers[index](x, cos, sin)  # [batch, seq, hidden]
        if not last or self.lm_head is None:
            return x
        return self.lm_head(self.norm(x))  # [batch, seq, vocab]


def communicate(name, *, send_tensor=None, send_peer=None, recv_peer=None, shape=None, device=None, dtype=None):
    """Post this stage's sends and receives together, then wait for all of them. Posting both before
    waiting is what keeps two neighbours that send to each other at the same time from deadlocking."""
    ops, received = [], None
    if send_peer is not None:
        log(f"{name}: send {tuple(send_tensor.shape)} -> rank {send_peer}")
        ops.append(dist.P2POp(dist.isend, send_tensor.contiguous(), send_peer))
    if recv_peer is not None:
        log(f"{name}: recv {tuple(shape)} <- rank {recv_peer}")
        received = torch.empty(shape, device=device, dtype=dtype)
        ops.append(dist.P2POp(dist.irecv, received, recv_peer))
    if ops:
        for request in dist.batch_isend_irecv(ops):
            request.wait()
    return received


def recv_forward(shape, device, dtype):
    """The previous stage's output activations, as a leaf that will collect their gradient (None on stage 0)."""
    received = communicate("recv_forward", recv_peer=pgm.process_group_manager.pp_prev_rank, shape=shape,
                           device=device, dtype=dtype)
    return None if received is None else received.requires_grad_()


def send_forward(output_tensor):
    communicate("send_forward", send_tensor=output_tensor, send_peer=pgm.process_group_manager.pp_next_rank)


def recv_backward(shape, device, dtype):
    """The gradient of the loss with respect to this stage's output (None on the last stage)."""
    return communicate("recv_backward", recv_peer=pgm.process_group_manager.pp_next_rank, shape=shape,
                       device=device, dtype=dtype)


def send_backward(input_grad):
    communicate("send_backward", send_tensor=input_grad, send_peer=pgm.process_group_manager.pp_prev_rank)


def send_forward_recv_backward(output_tensor, *, shape, device, dtype):
    """1F1B steady state: hand this micro-batch's output to the next stage and, in the same exchange, take
    back the gradient of the oldest micro-batch it holds (None on the last stage)."""
    next_rank = pgm.process_group_manager.pp_next_rank
    return communicate("send_forward_recv_backward", send_tensor=output_tensor, send_peer=next_rank,
                       recv_peer=next_rank, shape=shape, device=device, dtype=dtype)


def send_backward_recv_forward(input_grad, *, shape, device, dtype):
    """1F1B steady state: hand a gradient to the previous stage and take its next activations (None on stage 0)."""
    prev_rank = pgm.process_group_manager.pp_prev_rank
    received = communicate("send_backward_recv_forward", send_tensor=input_grad, send_peer=prev_rank,
                           recv_peer=prev_rank, shape=shape, device=device, dtype=dtype)
    return None if received is None else received.requires_grad_()


@timeline("forward")
def forward_step(model, data_loader, *, input_tensor, device, losses):
    """One micro-batch through this stage. Every stage draws every micro-batch, so all stages agree on the
    positions. The last stage returns the loss, scaled by 1/grad_acc_steps exactly as train_step does,
    and appends its value to losses."""
    batch = next(data_loader)
    output = model(input_ids=batch["input_ids"].to(device), position_ids=batch["position_ids"].to(device),
                   hidden_states=input_tensor)  # [batch, seq, hidden], or [batch, seq, vocab] on the last stage
    if not pgm.process_group_manager.pp_is_last_stage:
        return output
    target_ids = batch["target_ids"].to(device)  # [batch, seq]
    loss = F.cross_entropy(output.reshape(-1, output.shape[-1]).float(), target_ids.reshape(-1))
    loss = loss / data_loader.grad_acc_steps
    losses.append(loss.detach())
    return loss


@timeline("backward", units=2)  # a whole backward: B and W
def backward_step(input_tensor, output_tensor, output_grad):
    """Backpropagate one micro-batch through this stage; returns the gradient for the previous stage."""
    # On the last stage output_tensor is the scalar loss and output_grad is None (d loss / d loss = 1).
    torch.autograd.backward(output_tensor, grad_tensors=output_grad)
    return None if input_tensor is None else input_tensor.grad


class HeldActivations:
    """The micro-batches whose forward has run and whose backward has not: their autograd graphs (all the
    activations saved for backward) stay in memory until then. Backwards run oldest first."""

    def __init__(self):
        self.queue = deque()
        self.peak = 0  # the most micro-batches held at once: what a schedule costs in activation memory

    def push(self, input_tensor, output_tensor):
        self.queue.append((input_tensor, output_tensor))
        self.peak = max(self.peak, len(self.queue))

    def pop(self):
        return self.queue.popleft()


def set_grad_sync(model, enabled):
    # Under data parallelism gradients are all-reduced once, in the backward of the last micro-batch
    # (the same rule as train.py's train_step).
    if pgm.process_group_manager.cp_dp_world_size > 1:
        model.require_backward_grad_sync = enabled


def forward_and_send(model, data_loader, *, held, losses, tensor_shapes, device, dtype):
    """Receive this stage's input, run one micro-batch forward, send the output on and hold it for backward."""
    input_tensor = recv_forward(tensor_shapes, device, dtype)
    output_tensor = forward_step(model, data_loader, input_tensor=input_tensor, device=device, losses=losses)
    send_forward(output_tensor)
    held.push(input_tensor, output_tensor)


def backward_and_send(model, held, *, is_last_backward, tensor_shapes, device, dtype):
    """Receive the gradient of the oldest micro-batch held, run its backward, send the input gradient back."""
    set_grad_sync(model, is_last_backward)
    output_grad = recv_backward(tensor_shapes, device, dtype)
    input_grad = backward_step(*held.pop(), output_grad)
    send_backward(input_grad)


def train_step_pipeline_afab(model, data_loader, *, tensor_shapes, device, dtype):
    """All forward, all backward. tensor_shapes = (micro_batch_size, seq_len, hidden_size): the shape of
    every activation and gradient sent between stages. Returns the summed micro-batch losses on the last
    stage (as train_step does), 0.0 elsewhere."""
    grad_acc_steps = data_loader.grad_acc_steps
    held, losses = HeldActivations(), []

    for _ in range(grad_acc_steps):
        forward_and_send(model, data_loader, held=held, losses=losses, tensor_shapes=tensor_shapes, device=device,
                         dtype=dtype)
    for micro_batch in range(grad_acc_steps):
        backward_and_send(model, held, is_last_backward=micro_batch == grad_acc_steps - 1, tensor_shapes=tensor_shapes,
                          device=device, dtype=dtype)

    log(f"afab: held at most {held.peak} micro-batches of activations (grad_acc_steps {grad_acc_steps})")
    return sum(losses, torch.zeros((), dtype=torch.float64, device=device))  # in float64, as Python floats


def train_step_pipeline_1f1b(model, data_loader, *, tensor_shapes, device, dtype):
    """One forward, one backward. Warm-up: stage r runs pp_size - r - 1 forwards, enough to keep the stages
    after it busy; steady state: every new forward is paired with the backward of the oldest micro-batch
    held; cool-down: the backwards left over. Same arguments and result as train_step_pipeline_afab."""
    grid = pgm.process_group_manager
    grad_acc_steps = data_loader.grad_acc_steps
    num_warmup = min(grid.pp_world_size - grid.pp_rank - 1, grad_acc_steps)
    num_steady = grad_acc_steps - num_warmup
    held, losses = HeldActivations(), []

    # Warm-up: forwards only, filling the pipeline.
    for _ in range(num_warmup):
        forward_and_send(model, data_loader, held=held, losses=losses, tensor_shapes=tensor_shapes, device=device,
                         dtype=dtype)

    # Steady state: one forward, then the backward of the oldest micro-batch held.
    if num_steady > 0:
        input_tensor = recv_forward(tensor_shapes, device, dtype)
    for micro_batch in range(num_steady):
        is_last_steady = micro_batch == num_steady - 1
        output_tensor = forward_step(model, data_loader, input_tensor=input_tensor, device=device, losses=losses)
        output_grad = send_forward_recv_backward(output_tensor, shape=tensor_shapes, device=device, dtype=dtype)
        held.push(input_tensor, output_tensor)  # num_warmup + 1 = pp_size - pp_rank held here at most
        # With no warm-up (the last stage) the last steady backward is the step's last backward.
        set_grad_sync(model, num_warmup == 0 and is_last_steady)
        input_grad = backward_step(*held.pop(), output_grad)
        if is_last_steady:
            send_backward(input_grad)
        else:
            input_tensor = send_backward_recv_forward(input_grad, shape=tensor_shapes, device=device, dtype=dtype)

    # Cool-down: the backwards of the micro-batches still held, draining the pipeline.
    for micro_batch in range(num_warmup):
        backward_and_send(model, held, is_last_backward=micro_batch == num_warmup - 1, tensor_shapes=tensor_shapes,
                          device=device, dtype=dtype)

    log(f"1f1b: held at most {held.peak} micro-batches of activations (grad_acc_steps {grad_acc_steps})")
    return sum(losses, torch.zeros((), dtype=torch.float64, device=device))  # in float64, as Python floats
