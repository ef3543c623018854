"""step3's training loop under torchrun on the embedded defaults: learning, exact gradient
accumulation, determinism, metrics file and offline W&B."""
import json

import pytest

from conftest import concurrently, max_abs_diff

SMALL = ["--seq_len", 32, "--learning_rate", 1e-3]
ACCUMULATIONS = ((4, 1), (2, 2), (1, 4))  # (micro_batch_size, gradient_accumulation_steps): a global batch of 4


def accumulation_run(micro_batch_size, grad_acc):
    # 5 optimizer steps of a global batch of 4 chunks of 32 tokens
    return ("step3", 1, *SMALL, "--micro_batch_size", micro_batch_size, "--gradient_accumulation_steps", grad_acc,
            "--max_tokens", 5 * 4 * 32)


@pytest.fixture(scope="module")
def runs(torchrun):
    """Every launch of this module, one process each, two at a time. "again" repeats (4, 1) in a launch of its
    own (not from the cache)."""
    launches = {"e2e": ("step3", 1, "--seq_len", 64, "--micro_batch_size", 4, "--gradient_accumulation_steps", 2,
                        "--max_tokens", 30 * 8 * 64, "--use_wandb", "--run_name", "e2e"),
                **{accumulation: accumulation_run(*accumulation) for accumulation in ACCUMULATIONS},
                "again": accumulation_run(4, 1),
                "other_seed": (*accumulation_run(4, 1), "--seed", 43)}

    def launch(item):
        name, launch = item
        return name, torchrun(*launch, cached=name != "again")

    return dict(concurrently(launch, launches.items()))


def test_end_to_end_loss_falls_with_metrics_and_offline_wandb(runs, torchrun):
    run = runs["e2e"]
    assert run.returncode == 0, run
    assert [m["step"] for m in run.metrics] == list(range(1, 31))
    first, last = run.losses[0], run.losses[-1]
    assert 7.5 < first < 8.8  # ~ln(4096) = 8.32 for a fresh model
    assert last <= 0.8 * first, run.losses
    for m in run.metrics:
        assert m["tokens"] == m["step"] * 8 * 64
        assert m["tokens_per_second"] > 0 and m["tokens_per_second_per_device"] == m["tokens_per_second"]
    assert "Step: 30" in run.stdout and "Tokens/s/device" in run.stdout and "Memory:" in run.stdout
    # --use_wandb without credentials: says so and leaves an offline run behind
    assert "logging offline" in run.stdout
    offline_runs = list((torchrun.tmp_root / "wandb").glob("offline-run-*"))
    assert offline_runs, sorted(p.name for p in torchrun.tmp_root.iterdir())
    assert any(f.suffix == ".wandb" for run_dir in offline_runs for f in run_dir.iterdir())


def test_gradient_accumulation_is_exact(runs):
    runs = {accumulation: runs[accumulation] for accumulation in ACCUMULATIONS}
    for run in runs.values():
        assert run.returncode == 0, run
        assert len(run.losses) == 5
    reference = runs[(4, 1)].losses
    assert reference[-1] < reference[0]
    for key in ((2, 2), (1, 4)):
        assert max_abs_diff(runs[key].losses, reference) <= 1e-5, (key, runs[key].losses, reference)


def test_same_seed_same_losses_and_other_seed_differs(runs):
    first, again, other = runs[(4, 1)], runs["again"], runs["other_seed"]
    assert again.returncode == 0 and other.returncode == 0
    assert again.losses == first.losses
    assert other.losses != first.losses


def test_metrics_file_is_json_lines_with_the_documented_keys(runs):
    run = runs[(4, 1)]
    for m in run.metrics:
        assert {"step", "loss", "grad_norm", "lr", "tokens", "tokens_per_second", "tokens_per_second_per_device",
                "tflops_per_device", "mfu", "memory_gb"} == set(m)
        assert isinstance(m["step"], int) and isinstance(m["loss"], float)
        assert m["grad_norm"] > 0 and m["lr"] > 0
    json.dumps(run.metrics)
