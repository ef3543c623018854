"""A Llama decoder in one file, read top to bottom.

Module and parameter names mirror transformers' LlamaForCausalLM
(`embed_tokens`, `layers.N.self_attn.q_proj`, ...), so a Hugging Face state dict
loads with nothing more than dropping its `model.` prefix.

From step 12 on no rank builds the whole model: train.py builds it on the meta device (shapes, no memory) and
fills in only what the rank keeps, from seeded_parameters: the values Llama(config) draws from the seed, one
tensor at a time.

Activation recomputation (step 13, --recompute, set_recompute): backward needs tensors that forward computed
(a matmul's input, to get its weight's gradient; silu's input, ...), and autograd keeps them from forward to
backward: for a long sequence they are most of a rank's memory. `recomputed` drops what a function computes
inside and runs it again in backward from its inputs (torch.utils.checkpoint, non-reentrant):
    full        each decoder layer keeps only its input; its whole forward runs twice (about a third more compute)
    selective   every matmul keeps its input and output; the element-wise work between them that keeps large
                tensors of its own runs again: RMSNorm's fp32 statistics and SiLU(gate) * up. Cheap to redo, and as
                large as the matmuls' outputs (in bf16 RMSNorm's fp32 copy of its input is twice as large). Not the
                rotary embedding: it keeps only cos and sin (shared by every layer), and recomputing it would keep
                q and k before the rotation as its inputs, more than it saves
    none        everything kept (every earlier step)

Mixture of experts (step 15): a Mixtral config (model_type "mixtral") puts moe.py's sparse MoE block, a router and
num_local_experts SwiGLU experts, where every decoder layer's MLP is; the rest of the model is Llama's, so the same
class loads transformers' MixtralForCausalLM weights (load_hf_state_dict). Selective recomputation leaves the
experts alone (full recomputation runs them again with the rest of the layer).
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from moe import SparseMoeBlock, fuse_legacy_experts, is_moe


def rope_theta(config):
    # transformers >= 5 keeps rope settings in `config.rope_parameters`; older versions in `rope_theta`.
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type != "default":
        raise ValueError(f"rope_type {rope_type!r} is not supported (only the default rotary embedding)")
    return float(params.get("rope_theta", getattr(config, "rope_theta", 10000.0)))


def rotary_cos_sin(position_ids, head_dim, theta, dtype):
    """cos/sin of every position's rotation angles, computed in fp32 then cast (as transformers does)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim))
    angles = position_ids[..., None].float() * inv_freq  # [batch, seq, head_dim / 2]
    angles = torch.cat((angles, angles), dim=-1)  # [batch, seq, head_dim]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x, cos, sin):
    # x: [batch, heads, seq, head_dim]; cos/sin: [batch, seq, head_dim], shared by every head
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


REDRAWN = (nn.Linear, nn.Embedding)  # what Llama._init_weights draws again after construction
RECOMPUTE = ("none", "selective", "full")


def recomputed(function, *args, enabled):
    """function(*args). When enabled (and gradients are on), nothing function computes inside is kept for backward:
    backward runs it again from its inputs. Its inputs and output are kept by whoever else needs them."""
    if enabled and torch.is_grad_enabled():
        return checkpoint(function, *args, use_reentrant=False)
    return function(*args)


class RMSNorm(nn.Module):
    recompute = False  # selective recomputation: the fp32 statistics computed again in backward

    def __init__(self, hidden_size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def reset_parameters(self):  # as nn.Linear and nn.Embedding have: what materialising a meta module calls
        nn.init.ones_(self.weight)

    def normalise(self, x):
        # Normalise in fp32 so bf16 activations do not lose the small variances.
        x_fp32 = x.float()
        x_fp32 = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        return x_fp32.to(x.dtype)

    def forward(self, x):
        return self.weight * recomputed(self.normalise, x, enabled=self.recompute)


def causal_attention(q, k, v):
    """Causal attention over the whole sequence: [batch, heads, seq, head_dim] each -> the same shape.
    Grouped-query attention: each key/value head serves heads/kv_heads consecutive query heads; enable_gqa lets
    the kernel share them without materialising repeated copies of k and v."""
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)


def swiglu(gate, up):
    return F.silu(gate) * up


class Attention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        bias = getattr(config, "attention_bias", False)
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=bias)
        self.attend = causal_attention  # context_parallel.py puts ring attention here instead

    def forward(self, x, cos, sin):
        # The number of heads is read off the projection's output (-1 below), not the config, so the same code runs
        # on a layer that holds only some of the heads; and the sequence too: under sequence parallelism x holds this
        # rank's part of it, and the projections' outputs the whole.
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        batch, seq, _ = q.shape
        q = q.view(batch, seq, -1, self.head_dim).transpose(1, 2)  # [batch, heads, seq, head_dim]
        k = k.view(batch, seq, -1, self.head_dim).transpose(1, 2)  # [batch, kv_heads, seq, head_dim]
        v = v.view(batch, seq, -1, self.head_dim).transpose(1, 2)  # [batch, kv_heads, seq, head_dim]
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = self.attend(q, k, v)  # [batch, heads, seq, head_dim]
        out = out.transpose(1, 2).reshape(batch, seq, -1)  # [batch, seq, heads * head_dim]
        return self.o_proj(out)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""
    recompute = False  # selective recomputation: silu(gate) * up computed again in backward

    def __init__(self, config):
        super().__init__()
        bias = getattr(config, "mlp_bias", False)
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=bias)

    def forward(self, x):
        return self.down_proj(recomputed(swiglu, self.gate_proj(x), self.up_proj(x), enabled=self.recompute))


class DecoderLayer(nn.Module):
    recompute = False  # full recomputation: only the layer's input kept, its forward run again in backward

    def __init__(self, config):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SparseMoeBlock(config) if is_moe(config) else MLP(config)

    def forward(self, x, cos, sin):
        return recomputed(self.compute, x, cos, sin, enabled=self.recompute)

    def compute(self, x, cos, sin):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.rope_theta = rope_theta(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.apply(self._init_weights)
        if getattr(config, "tie_word_embeddings", False):
            self.lm_head.weight = self.embed_tokens.weight

    def _init_weights(self, module):
        # Same scheme as transformers: N(0, initializer_range) for matrices, zero biases, ones for norms.
        std = getattr(self.config, "initializer_range", 0.02)
        if isinstance(module, REDRAWN):
            nn.init.normal_(module.weight, mean=0.0, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, input_ids, position_ids=None):
        batch, seq = input_ids.shape
        if position_ids is None:
            if any(layer.self_attn.attend is not causal_attention for layer in self.layers):
                # 0..seq-1 would be wrong: this rank holds a zigzag share of every sequence, not its start
                raise ValueError("position_ids are required under context parallelism: pass the true positions "
                                 "of this rank's tokens (split_batch_for_context_parallel gives them)")
            position_ids = torch.arange(seq, device=input_ids.device).expand(batch, seq)
        x = self.embed_tokens(input_ids)  # [batch, seq, hidden]
        cos, sin = rotary_cos_sin(position_ids, self.head_dim, self.rope_theta, x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin)  # [batch, seq, hidden]
        return self.lm_head(self.norm(x))  # [batch, seq, vocab]

    def load_hf_state_dict(self, hf_state_dict):
        """Copy weights from a transformers LlamaForCausalLM or MixtralForCausalLM state dict (tied lm_head or not;
        Mixtral's experts fused as transformers 5 holds them, or one tensor per expert as save_pretrained writes)."""
        state = {name.removeprefix("model."): tensor for name, tensor in hf_state_dict.items()}
        if is_moe(self.config):
            state = fuse_legacy_experts(state, self.config.num_local_experts)
        state.setdefault("lm_head.weight", state["embed_tokens.weight"])
        # Rotary buffers are recomputed on the fly; anything else unknown is a real mismatch.
        state = {name: tensor for name, tensor in state.items() if "rotary_emb" not in name}
        self.load_state_dict(state, strict=True)


def set_recompute(model, mode):
    """--recompute (one of RECOMPUTE, see the module docstring) on every decoder layer, norm and MLP."""
    for module in model.modules():
        if isinstance(module, DecoderLayer):
            module.recompute = mode == "full"
        elif isinstance(module, (RMSNorm, MLP)):
            module.recompute = mode == "selective"


def seeded_parameters(config, seed):
    """(name, full fp32 CPU tensor) for every parameter of Llama(config) built after torch.manual_seed(seed), in the
    model's order, one tensor in memory at a time: bit for bit what the full build holds, without building it.

    The full build draws twice from the seed stream: each nn.Linear and nn.Embedding initialises itself as it is
    constructed (reset_parameters), then _init_weights draws every matrix again. Both passes run here over copies
    of one module at a time, in the same order (the order of named_modules, which is the order of construction),
    so the stream advances exactly as it did: a tied LM head draws its own values too, then uses the embedding's."""
    with torch.device("meta"):
        skeleton = Llama(config)  # shapes only: no memory, no random numbers
    leaves = [(prefix, module) for prefix, module in skeleton.named_modules()
              if list(module.parameters(recurse=False))]
    torch.manual_seed(seed)
    built = {}  # the constructors' values of what _init_weights leaves alone (the norms' ones): small
    for prefix, module in leaves:  # what the constructors draw, all of it before _init_weights draws anything
        full = copy.deepcopy(module).to_empty(device="cpu")
        full.reset_parameters()
        if not isinstance(full, REDRAWN):
            built[prefix] = full
    seen = set()
    for prefix, module in leaves:  # what _init_weights draws over it: the values the model keeps
        full = built.pop(prefix) if prefix in built else copy.deepcopy(module).to_empty(device="cpu")
        skeleton._init_weights(full)
        for name, meta in module.named_parameters(recurse=False):
            if meta not in seen:  # a tied LM head is the embedding's weight, yielded once
                seen.add(meta)
                yield f"{prefix}.{name}", getattr(full, name).detach()
