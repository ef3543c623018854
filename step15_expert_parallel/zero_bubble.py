"""Zero bubble's split backward (Qi et al. 2023): a linear layer's backward is two matmuls that nothing forces to run
together. B, the input's gradient (grad_output @ W), is what the previous layer and the previous pipeline stage wait
for; W, the weight's gradient (grad_output^T @ x), waits for nobody until the optimizer step. So while weight
gradients are being deferred, each linear's backward computes B and queues W, and a pipeline schedule (zb_h1) runs
the queued W where its stage would otherwise idle.

    split_weight_gradients(model)             # every linear of the model computes through SplitLinear
    with deferred_weight_gradients() as work:  # a B pass: the linears' weight gradients are queued in work
        torch.autograd.backward(output, grad)
    run_weight_gradients(work)                # the W pass: each weight gradient computed and accumulated

Only the linears' weights wait: the norms' weights and the embedding get their gradients in B (they are cheap).
W accumulates through autograd (backward on the weight itself), so the data-parallel wrapper's gradient hooks see
it as any other gradient. W keeps the linear's input and its output's gradient alive from B to W: zb_h1 bounds
how long. Outside deferred_weight_gradients (a single process, the other engines) SplitLinear computes both.
"""
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

_split = {"on": False}  # does linear() go through SplitLinear: set once by split_weight_gradients
_deferred = {"work": None}  # the list a B pass queues W into, or None: compute the weight gradients at once


def linear(x, weight, bias=None):
    """F.linear; under split_weight_gradients, one whose weight gradient can wait for a W pass."""
    return SplitLinear.apply(x, weight, bias) if _split["on"] else F.linear(x, weight, bias)


def weight_gradients(x, grad_output, has_bias):
    """W of y = x @ weight^T + bias: [out, in] and [out] from x [..., in] and grad_output [..., out]."""
    grad_output = grad_output.reshape(-1, grad_output.shape[-1])  # [tokens, out]
    grad_weight = grad_output.t().matmul(x.reshape(-1, x.shape[-1]))  # [out, in]
    return grad_weight, grad_output.sum(0) if has_bias else None


def weight_backward(weight, bias, x, grad_output):
    """The weight (and bias) gradients of a linear's backward: computed now, or, inside deferred_weight_gradients,
    queued for the W pass and (None, None) returned (autograd then gives the weight nothing in this pass)."""
    if _deferred["work"] is None:
        return weight_gradients(x, grad_output, bias is not None)
    _deferred["work"].append((weight, bias, x, grad_output))
    return None, None


class SplitLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.bias = bias
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        grad_input = grad_output.matmul(weight)  # B: [..., out] @ [out, in]
        grad_weight, grad_bias = weight_backward(weight, ctx.bias, x, grad_output)  # W, or queued
        return grad_input, grad_weight, grad_bias


class Linear(nn.Linear):
    """nn.Linear computing through linear() (split_weight_gradients turns a model's nn.Linear into this)."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)


def split_weight_gradients(model, on=True):
    """From now on every linear of the model can leave its weight gradient to a W pass: nn.Linear modules become
    Linear (the same parameters), and the tensor-parallel linears call linear() already."""
    _split["on"] = on
    for module in model.modules():
        if type(module) in (nn.Linear, Linear):
            module.__class__ = Linear if on else nn.Linear


@contextlib.contextmanager
def deferred_weight_gradients():
    """Inside: every linear's backward queues its weight gradient in the list yielded, for run_weight_gradients."""
    work = []
    _deferred["work"] = work
    try:
        yield work
    finally:
        _deferred["work"] = None


def run_weight_gradients(work):
    """The W pass: every queued weight gradient, accumulated into its parameter (autograd's own accumulation, so
    gradient hooks run). Returns how many linears it ran."""
    for weight, bias, x, grad_output in work:
        grad_weight, grad_bias = weight_gradients(x, grad_output, bias is not None)
        params, grads = [weight], [grad_weight]
        if bias is not None:
            params, grads = [weight, bias], [grad_weight, grad_bias]
        torch.autograd.backward(params, grads)
    count = len(work)
    work.clear()  # the inputs and output gradients they kept are freed
    return count
