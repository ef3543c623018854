"""The training loop as large runs do it (step 3 on), in-process: the learning rate of every step is the warm-up +
cosine formula, the matrices decay and the 1-D tensors do not, clipping follows clip_grad_norm_, ZeRO's optimizer
(flat pieces cut at parameter boundaries into the same two groups, its own clip) takes torch's AdamW steps bit for bit,
and an MFU above 100% is re-measured and said. The layouts' global norms are held against the single process by the
parity tests (conftest.assert_parity) and tests/tp_layer_check.py."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import import_step

TINY = SimpleNamespace(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, rms_norm_eps=1e-5, initializer_range=0.02, tie_word_embeddings=False)


def learning_rates(optimizer_module, schedule, warmup_steps, total_steps, peak=1e-3):
    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=peak)
    scheduler = optimizer_module.lr_scheduler(optimizer, schedule, warmup_steps, total_steps)
    rates = []
    for _ in range(total_steps):
        rates.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return rates


def test_the_learning_rate_warms_up_then_follows_the_cosine_to_a_tenth():
    optimizer_module = import_step("step3", "optimizer")
    rates = learning_rates(optimizer_module, "cosine", warmup_steps=10, total_steps=100)
    for step, rate in enumerate(rates, start=1):
        if step <= 10:
            expected = 1e-3 * step / 10
        else:
            expected = 1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - 10) / 90)))
        assert rate == pytest.approx(expected, rel=1e-12), step
    assert rates[:10] == sorted(rates[:10]) and rates[9] == pytest.approx(1e-3)  # rises to the peak at step 10
    assert rates[10:] == sorted(rates[10:], reverse=True)  # then only falls
    assert rates[-1] == pytest.approx(1e-4)  # to 10% at the last step
    assert learning_rates(optimizer_module, "constant", warmup_steps=3, total_steps=6) == pytest.approx(
        [1e-3 / 3, 2e-3 / 3, 1e-3, 1e-3, 1e-3, 1e-3])
    # no warm-up: the cosine's first step is already on its way down (the peak is step 0, the start)
    assert learning_rates(optimizer_module, "cosine", warmup_steps=0, total_steps=3) == pytest.approx(
        [1e-3 * (0.1 + 0.45 * (1 + math.cos(math.pi * step / 3))) for step in (1, 2, 3)])


def test_the_default_warm_up_is_a_tenth_of_the_run_and_a_longer_one_is_said(capsys):
    optimizer_module = import_step("step3", "optimizer")
    assert optimizer_module.resolve_warmup_steps(None, 100) == 10
    assert optimizer_module.resolve_warmup_steps(None, 5) == 0
    assert optimizer_module.resolve_warmup_steps(120, 100) == 120
    assert "--warmup_steps 120 is beyond the run's last step 100" in capsys.readouterr().err


def test_matrices_decay_and_norm_weights_do_not():
    model_module, optimizer_module = import_step("step3", "model", "optimizer")
    model = model_module.Llama(TINY)
    decaying, not_decaying = optimizer_module.decay_groups(model.parameters(), weight_decay=0.1)
    names = {param: name for name, param in model.named_parameters()}
    assert decaying["weight_decay"] == 0.1 and not_decaying["weight_decay"] == 0.0
    assert sorted(names[p] for p in not_decaying["params"]) == sorted(
        name for name, p in model.named_parameters() if "norm" in name)
    assert all(p.dim() == 2 for p in decaying["params"]) and all(p.dim() == 1 for p in not_decaying["params"])
    assert len(decaying["params"]) + len(not_decaying["params"]) == len(list(model.parameters()))
    # with a zero gradient, AdamW's update is the decay alone: the matrices shrink, the norm weights stay
    optimizer = torch.optim.AdamW([decaying, not_decaying], lr=0.5)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    for name, p in model.named_parameters():
        if "norm" in name:
            assert torch.equal(p, before[name]), name
        else:
            assert torch.equal(p, before[name] * (1 - 0.5 * 0.1)), name


def loss_and_backward(model, seed):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, TINY.vocab_size, (2, 12), generator=generator)
    target_ids = torch.randint(0, TINY.vocab_size, (2, 12), generator=generator)
    logits = model(input_ids)  # [batch, seq, vocab]
    F.cross_entropy(logits.reshape(-1, TINY.vocab_size), target_ids.reshape(-1)).backward()


def test_clipping_follows_clip_grad_norm_():
    model_module, optimizer_module = import_step("step3", "model", "optimizer")
    torch.manual_seed(0)
    ours = model_module.Llama(TINY)
    theirs = model_module.Llama(TINY)
    theirs.load_state_dict(ours.state_dict())
    for model in (ours, theirs):
        loss_and_backward(model, seed=1)
    expected = torch.nn.utils.clip_grad_norm_(theirs.parameters(), max_norm=0.1)
    norm = optimizer_module.clip_grad_norm(ours, max_norm=0.1)
    assert norm.item() == pytest.approx(expected.item(), rel=1e-6)
    assert norm.item() > 0.1  # so it clipped
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=0, msg=name)
    assert optimizer_module.clip_grad_norm(ours, max_norm=0).item() == pytest.approx(0.1, rel=1e-5)  # 0: no clip


def test_zero_adamw_takes_torch_adamws_steps_with_the_decay_groups_and_the_clip(monkeypatch):
    """Step 11's ZeroAdamW on one rank, with buckets of 50 KB so that a bucket holds several parameters (norm weights
    beside matrices): its pieces cut at parameter boundaries, AdamW in two groups and its own clip take the steps of
    torch's AdamW with step 3's decay groups and clip_grad_norm_ (to float rounding: the two norms are summed in
    another order: the scale differs in its last bits, which Adam turns into 1e-8 where a gradient is near zero; a
    norm weight that decayed would be off by 1e-3)."""
    pgm, model_module, optimizer_module, zero, zero_optimizer = import_step(
        "step11", "process_group_manager", "model", "optimizer", "zero", "zero_optimizer")
    monkeypatch.setattr(pgm, "process_group_manager", SimpleNamespace(
        cp_dp_world_size=1, cp_dp_group=None, tp_rank=0, tp_world_size=1, pp_world_size=1))
    torch.manual_seed(0)
    reference = model_module.Llama(TINY)
    model = model_module.Llama(TINY)
    model.load_state_dict(reference.state_dict())
    reference_optimizer = torch.optim.AdamW(optimizer_module.decay_groups(reference.parameters(), 0.1), lr=1e-2)
    ours = zero.ZeroDataParallel(model, zero_stage=1, bucket_size_mb=0.05)
    assert any(len({p.dim() for p in bucket.params}) == 2 for bucket in ours.buckets)  # mixed buckets
    ours_optimizer = zero_optimizer.ZeroAdamW(ours, lr=1e-2, weight_decay=0.1)
    assert [piece.decays for piece in ours_optimizer.pieces] == [
        param.dim() >= 2 for bucket in ours.buckets for param in bucket.params]
    for step in range(3):
        reference_optimizer.zero_grad()
        ours.zero_grad()
        loss_and_backward(reference, seed=step)
        loss_and_backward(ours, seed=step)
        ours.finish_gradient_synchronization()
        expected = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm=0.05)
        norm = ours_optimizer.clip_grad_norm(max_norm=0.05)
        assert norm.item() == pytest.approx(expected.item(), rel=1e-6)
        reference_optimizer.step()
        ours_optimizer.step()
        for (name, p), q in zip(reference.named_parameters(), model.parameters()):
            torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)
    exp_avg, exp_avg_sq, adam_step = ours_optimizer.owned_state(ours.buckets[0])
    assert adam_step.item() == 3 and exp_avg.abs().sum() > 0 and exp_avg_sq.abs().sum() > 0


def test_an_mfu_above_100_percent_is_measured_again_and_said():
    train = import_step("step3", "train")
    progress = train.Progress.__new__(train.Progress)
    progress.device, progress.peak_flops, progress.peak_measured = torch.device("cpu"), 1.0, True
    mfu, why = progress.mfu(1e18)  # no CPU reaches an exaFLOP/s: still above the peak measured again
    assert progress.peak_flops > 1e6  # re-measured, and kept since it is higher
    assert mfu > 1 and "above the measured peak" in why
    assert progress.mfu(progress.peak_flops / 2) == (0.5, "")
