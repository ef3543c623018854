"""Our Llama against transformers' LlamaForCausalLM with the same weights (fp32, CPU)."""
import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import import_step

CONFIGS = {
    # grouped-query attention (4 query heads share each kv head), untied lm_head, non-default theta
    "gqa": dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False, rope_theta=500.0),
    # multi-head attention with the lm_head tied to the embedding
    "tied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True, rope_theta=10000.0),
}


def build_pair(step, name):
    config = LlamaConfig(vocab_size=384, hidden_size=64, intermediate_size=176, num_hidden_layers=3,
                         max_position_embeddings=64, rms_norm_eps=1e-5, **CONFIGS[name])
    torch.manual_seed(0)
    theirs = LlamaForCausalLM(config).float()
    # transformers initialises norms to ones; perturb them so the test sees if a norm weight is misplaced
    with torch.no_grad():
        for param_name, param in theirs.named_parameters():
            if "norm" in param_name:
                param.add_(0.1 * torch.randn_like(param))
    Llama = import_step(step, "model").Llama
    ours = Llama(config)
    ours.load_hf_state_dict(theirs.state_dict())
    return theirs, ours


@pytest.mark.parametrize("step", ["step1", "step3"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_and_gradients_match_transformers(step, name):
    theirs, ours = build_pair(step, name)
    torch.manual_seed(1)
    input_ids = torch.randint(0, 384, (3, 40))
    targets = torch.randint(0, 384, (3, 40))
    position_ids = torch.arange(40).expand(3, 40)

    their_logits = theirs(input_ids=input_ids, position_ids=position_ids).logits
    our_logits = ours(input_ids, position_ids)
    assert their_logits.shape == our_logits.shape == (3, 40, 384)
    assert (their_logits - our_logits).abs().max().item() <= 1e-4
    assert their_logits.std().item() > 0.1  # the comparison is between non-trivial outputs

    F.cross_entropy(their_logits.reshape(-1, 384), targets.reshape(-1)).backward()
    F.cross_entropy(our_logits.reshape(-1, 384), targets.reshape(-1)).backward()
    their_grads = {n.removeprefix("model."): p.grad for n, p in theirs.named_parameters()}
    our_grads = dict(ours.named_parameters())
    if name == "tied":
        assert ours.lm_head.weight is ours.embed_tokens.weight
    for param_name, param in our_grads.items():
        if param_name not in their_grads:  # the tied lm_head appears once in transformers' parameters
            continue
        assert (param.grad - their_grads[param_name]).abs().max().item() <= 1e-5, param_name
    assert len(set(our_grads) & set(their_grads)) == len(their_grads)


def test_loads_untied_and_tied_state_dicts_strictly():
    theirs, ours = build_pair("step1", "tied")
    state = theirs.state_dict()
    state.pop("lm_head.weight", None)  # a tied checkpoint may store the embedding only
    ours.load_hf_state_dict(state)
    assert torch.equal(ours.lm_head.weight, theirs.model.embed_tokens.weight)
    with pytest.raises(RuntimeError):
        ours.load_hf_state_dict({**state, "model.layers.0.mlp.extra.weight": torch.zeros(1)})
