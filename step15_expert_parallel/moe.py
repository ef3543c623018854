"""Mixture of experts (step 15): Mixtral's sparse MoE block in place of a decoder layer's MLP, and transformers'
load-balancing loss.

A dense layer sends every token through one MLP. A sparse MoE layer holds E MLPs (the experts, each a SwiGLU like
the dense one) and a router: a linear layer that scores every token against every expert. Each token goes to the k
experts it scores highest (Mixtral: k = 2 of E = 8), and the layer's output is their outputs weighted by the
router's probabilities, renormalised over the k chosen:

    probs = softmax(x @ router^T)                 [tokens, E], in fp32
    w, e  = top-k(probs)                          the k best experts of each token and their probabilities
    w     = w / sum(w)                            renormalised: each token's k weights add up to 1
    y     = sum over j of w_j * expert_{e_j}(x)

So a token costs k experts' compute while the layer holds E experts' parameters: more parameters for the same
FLOPs per token. The experts are stored as transformers 5 holds them, fused in two 3-D tensors per layer:
experts.gate_up_proj [E, 2 * intermediate, hidden] (gate rows, then up rows) and experts.down_proj
[E, hidden, intermediate].

Running the experts: a token-by-token loop would be slow, and a dense pass of every expert over every token
would cost E/k times the FLOPs. Instead the (token, choice) pairs are sorted by expert, so each expert's tokens are
one contiguous block, each block is one matmul per weight, and the results are put back in token order
(Experts.forward, SparseMoeBlock.run_experts). No token is dropped (dropless: no capacity limit), so an expert
may get any number of tokens, zero included. Under expert parallelism (expert_parallel.py) the sorted blocks
travel to the ranks that hold their experts and back, in between.

The load-balancing loss (Switch Transformer, eq. 4-6, as transformers computes it): a router that sends most tokens
to a few experts wastes the others, so the loss adds coef * E * sum_e f_e * P_e, with f_e the fraction of the
(token, choice) pairs that chose expert e and P_e the mean router probability of e, both summed over the layers
first (f is counted, not differentiable; the gradient reaches the router through P). It is smallest when both are
uniform. It is a statistic of one forward's tokens: see balance_loss.
"""
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def is_moe(config):
    return getattr(config, "model_type", None) == "mixtral"


class Router(nn.Module):
    """transformers' `mlp.gate`: one score per expert for every token."""

    def __init__(self, config):
        super().__init__()
        self.std = getattr(config, "initializer_range", 0.02)
        self.weight = nn.Parameter(torch.empty(config.num_local_experts, config.hidden_size))
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.normal_(self.weight, std=self.std)


class Experts(nn.Module):
    """E SwiGLU MLPs in two fused tensors. Under expert parallelism a rank holds experts
    [first, first + len) of them (expert_parallel.py cuts the tensors); the block still routes over all E."""

    def __init__(self, config):
        super().__init__()
        self.std = getattr(config, "initializer_range", 0.02)
        experts, hidden, inner = config.num_local_experts, config.hidden_size, config.intermediate_size
        self.num_experts = experts  # of the layer: a rank may hold fewer (gate_up_proj.shape[0])
        self.gate_up_proj = nn.Parameter(torch.empty(experts, 2 * inner, hidden))
        self.down_proj = nn.Parameter(torch.empty(experts, hidden, inner))
        self.first = 0  # the global index of this rank's first expert
        self.shared = None  # sequence parallelism: how the tp ranks share the weights (tensor_parallel.py)
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.normal_(self.gate_up_proj, std=self.std)
        nn.init.normal_(self.down_proj, std=self.std)

    def forward(self, tokens, counts):
        """tokens [sum(counts), hidden], sorted by expert: counts[i] rows for this rank's expert i. One matmul per
        weight and expert, on its block of rows."""
        gate_up, down = self.gate_up_proj, self.down_proj
        if self.shared is not None:
            gate_up, down = self.shared(gate_up), self.shared(down)
        # one view per expert, taken once: backward then stacks the experts' gradients into the fused tensor's, where
        # indexing gate_up[expert] would give each expert a zero-filled gradient of the whole tensor to add up
        gate_up, down = gate_up.unbind(0), down.unbind(0)
        outputs = []
        for expert, block in enumerate(tokens.split(counts)):
            gate, up = F.linear(block, gate_up[expert]).chunk(2, dim=-1)
            outputs.append(F.linear(F.silu(gate) * up, down[expert]))
        return torch.cat(outputs)


def local_dispatch(tokens, counts):
    """No expert parallelism: every expert is here. Returns (tokens for this rank's experts, their counts per local
    expert, the function that brings the experts' outputs back in the same order)."""
    return tokens, counts.tolist(), lambda outputs: outputs


class SparseMoeBlock(nn.Module):
    """transformers' MixtralSparseMoeBlock: router, top-k, experts (see the module docstring)."""

    def __init__(self, config):
        super().__init__()
        self.num_experts, self.top_k = config.num_local_experts, config.num_experts_per_tok
        self.gate = Router(config)
        self.experts = Experts(config)
        self.dispatch = local_dispatch  # expert_parallel.py: send each expert's tokens to its rank and back
        self.token_group = []  # the groups of ranks that share one micro-batch's tokens (cp, sequence parallelism)
        self.balance_scale = 1  # context parallelism: cp_size (see balance_loss)
        self.router_stats = None  # (choices per expert, summed probabilities, tokens) of the last forward

    def forward(self, x):
        batch, seq, hidden = x.shape
        flat = x.reshape(-1, hidden)  # [tokens, hidden]
        gate = self.gate.weight if self.experts.shared is None else self.experts.shared(self.gate.weight)
        probs = F.linear(flat, gate).float().softmax(dim=-1)  # [tokens, E]
        weights, chosen = probs.topk(self.top_k, dim=-1)  # [tokens, k] each
        weights = weights / weights.sum(dim=-1, keepdim=True)
        counts = torch.bincount(chosen.reshape(-1), minlength=self.num_experts)  # [E]
        self.router_stats = (counts.float(), probs.sum(dim=0), flat.shape[0])
        y = self.run_experts(flat, chosen, counts)  # [tokens, k, hidden]: each choice's expert output
        out = (y.float() * weights.unsqueeze(-1)).sum(dim=1)  # weighted in fp32, as the router's weights are
        return out.to(x.dtype).view(batch, seq, hidden)

    def run_experts(self, flat, chosen, counts):
        tokens, k = chosen.shape
        order = chosen.reshape(-1).argsort(stable=True)  # the (token, choice) pairs, grouped by expert
        sorted_tokens = flat.index_select(0, order // k)  # [tokens * k, hidden]
        local_tokens, local_counts, combine = self.dispatch(sorted_tokens, counts)
        outputs = combine(self.experts(local_tokens, local_counts))  # [tokens * k, hidden], sorted order
        # back in (token, choice) order: row order[i] of the result is row i of the outputs
        return outputs.new_empty(outputs.shape).index_copy(0, order, outputs).view(tokens, k, -1)


def moe_blocks(model):
    return [module for module in model.modules() if isinstance(module, SparseMoeBlock)]


def balance_loss(blocks):
    """transformers' load_balancing_loss_func over the blocks' last forward: E * sum_e f_e * P_e, where f_e is the
    fraction of (token, choice) pairs that chose e and P_e expert e's mean probability, each summed over the
    layers before the product. A statistic of one forward's tokens: the mean over a micro-batch, so runs agree at
    the same micro-batch size. When the tokens of a micro-batch are split over ranks (context parallelism,
    sequence parallelism: block.token_group) the counts and the number of tokens are summed over them first; each
    rank's value is then the whole micro-batch's loss, and its gradient the part that flows through its own tokens'
    probabilities."""
    counts = sum(block.router_stats[0] for block in blocks)
    probs = sum(block.router_stats[1] for block in blocks)
    rows = sum(block.router_stats[2] for block in blocks)
    groups, scale = blocks[0].token_group, blocks[0].balance_scale
    if groups:
        counts, total_probs = counts.clone(), probs.detach().clone()
        for group in groups:  # over cp ranks, then over tp ranks: over both
            dist.all_reduce(counts, group=group)
            dist.all_reduce(total_probs, group=group)
            rows *= dist.get_world_size(group)
        # the whole micro-batch's value; the gradient of this rank's own probabilities, times `scale` where the
        # ranks' gradients are averaged afterwards, not summed (context parallelism: over the cp ranks)
        probs = scale * probs + (total_probs - scale * probs).detach()
    experts = blocks[0].num_experts
    return experts * torch.sum((counts / rows) * (probs / rows))


def fuse_legacy_experts(state, num_experts):
    """The experts of Mixtral's original format (what save_pretrained writes: block_sparse_moe.experts.N.w1/w3/w2,
    block_sparse_moe.gate) as transformers 5 holds them (mlp.experts.gate_up_proj, down_proj, mlp.gate)."""
    prefixes = sorted({name.split(".block_sparse_moe.")[0] for name in state if ".block_sparse_moe." in name})
    for prefix in prefixes:
        old = f"{prefix}.block_sparse_moe"
        w = {n: [state.pop(f"{old}.experts.{e}.{n}.weight") for e in range(num_experts)] for n in ("w1", "w2", "w3")}
        state[f"{prefix}.mlp.experts.gate_up_proj"] = torch.stack([torch.cat(pair) for pair in zip(w["w1"], w["w3"])])
        state[f"{prefix}.mlp.experts.down_proj"] = torch.stack(w["w2"])
        state[f"{prefix}.mlp.gate.weight"] = state.pop(f"{old}.gate.weight")
    return state


def active_mlp_params(config):
    """Matmul weights a token goes through in one layer's MLP: k experts and the router (a dense MLP: all)."""
    mlp = 3 * config.hidden_size * config.intermediate_size
    if not is_moe(config):
        return mlp
    return config.num_experts_per_tok * mlp + config.hidden_size * config.num_local_experts
