"""What a run costs (steps 3-8): FLOPs per token against PyTorch's FLOP counter, each device's peak, the MFU
every log line reports, and bf16 training on a CPU (the mixed-precision paths, tested without a GPU)."""
import argparse
import math
import os
import re
import sys
import time

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import LlamaConfig

from conftest import ROOT, import_step

# The single-process fp32 run of the bf16 runs below: 10 steps of a global batch of 4 chunks of 32 tokens, with the
# default training loop (the same number of steps, so the same warm-up and cosine).
FP32_BASELINE = ["--seq_len", 32, "--learning_rate", 1e-3, "--gradient_accumulation_steps", 2,
                 "--max_tokens", 10 * 4 * 32, "--micro_batch_size", 2]
# The same global batch in bf16 for 10 steps, in three layouts; a fixed peak makes MFU deterministic.
PEAK_TFLOPS = 0.01
BF16 = ["--seq_len", 32, "--learning_rate", 1e-3, "--max_tokens", 10 * 4 * 32, "--dtype", "bfloat16",
        "--peak_tflops", PEAK_TFLOPS]
BF16_LAYOUTS = {
    "step3": (1, ["--micro_batch_size", 2, "--gradient_accumulation_steps", 2]),
    "step6": (2, ["--micro_batch_size", 1, "--gradient_accumulation_steps", 2, "--dp_size", 2,
                  "--bucket_size_mb", 1]),  # several fp32 gradient buckets
    "step8": (2, ["--micro_batch_size", 1, "--gradient_accumulation_steps", 4, "--pp_size", 2,
                  "--pp_engine", "1f1b"]),
}


def tiny_config(utils):
    return utils.load_config(argparse.Namespace(model_name=str(ROOT / "assets" / "tiny_llama"), seq_len=32))


def counted_flops(model, vocab_size, batch, seq_len):
    """FLOPs FlopCounterMode counts in one forward + backward of a cross-entropy loss."""
    input_ids = torch.randint(0, vocab_size, (batch, seq_len))
    with FlopCounterMode(display=False) as counter:
        logits = model(input_ids)  # [batch, seq, vocab]
        F.cross_entropy(logits.reshape(-1, vocab_size), input_ids.reshape(-1)).backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("step", ["step3", "step8"])
@pytest.mark.parametrize("shape", ["tiny_llama", "gqa_3_to_1"])
def test_flops_per_token_matches_pytorchs_flop_counter(step, shape):
    """FlopCounterMode counts matmuls (mm, bmm, addmm, ...) and the CUDA attention kernels, but not the CPU's
    fused attention kernel (_scaled_dot_product_flash_attention_for_cpu). So on a CPU:
    - with the default kernel it sees exactly the 6 N part: every weight's forward matmul (2 FLOPs per token)
      and the two backward ones (input and weight gradients, 4 more), lm_head included, embedding excluded;
      the convention's attention term 12 L h s is the whole gap: 3.0% of the total for the tiny Llama at
      seq 64, 8.6% for the second config at seq 48;
    - with the math kernel attention is two bmm per layer and direction over the full, unmasked s x s
      scores, which is exactly what the convention's 12 L h s counts, so the totals are equal."""
    model_module, utils = import_step(step, "model", "utils")
    if shape == "tiny_llama":  # 4 layers, hidden 256, 8 heads, 4 kv heads, vocab 4096
        config, seq_len = tiny_config(utils), 64
    else:
        config, seq_len = LlamaConfig(vocab_size=500, hidden_size=96, intermediate_size=200, num_hidden_layers=3,
                                      num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=False), 48
    torch.manual_seed(0)
    model = model_module.Llama(config)
    batch = 2
    tokens = batch * seq_len
    expected = utils.flops_per_token(config, seq_len)
    attention = 12 * config.num_hidden_layers * config.hidden_size * seq_len

    fused = counted_flops(model, config.vocab_size, batch, seq_len)
    assert fused == pytest.approx((expected - attention) * tokens, rel=1e-12)
    assert attention / expected == pytest.approx({"tiny_llama": 0.030, "gqa_3_to_1": 0.086}[shape], abs=1e-3)
    with sdpa_kernel(SDPBackend.MATH):
        spelled_out = counted_flops(model, config.vocab_size, batch, seq_len)
    assert spelled_out == pytest.approx(expected * tokens, rel=1e-12)


def test_flops_per_token_counts_the_whole_model_by_the_formula():
    utils = import_step("step8", "utils")
    config = tiny_config(utils)
    # per layer: q, o 256 x 256; k, v 256 x 128 (4 of 8 heads); gate, up, down 256 x 768; lm_head 256 x 4096
    matmul_params = 4 * (2 * 256 * 256 + 2 * 256 * 128 + 3 * 256 * 768) + 256 * 4096
    assert utils.flops_per_token(config, 128) == 6 * matmul_params + 12 * 4 * 256 * 128


@pytest.mark.parametrize("name,dtype,tflops", [
    ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989), ("NVIDIA H100 80GB HBM3", torch.float32, 67),
    ("NVIDIA H100 PCIe", torch.bfloat16, 756), ("NVIDIA H200", torch.bfloat16, 989),
    ("NVIDIA A100-SXM4-80GB", torch.bfloat16, 312), ("NVIDIA A100 80GB PCIe", torch.float32, 19.5),
    ("NVIDIA L40S", torch.bfloat16, 362), ("NVIDIA L4", torch.bfloat16, 121), ("NVIDIA A10G", torch.bfloat16, 125),
])
def test_known_gpus_peak_comes_from_the_table(monkeypatch, name, dtype, tflops):
    utils = import_step("step8", "utils")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    peak, source = utils.peak_flops_per_device(torch.device("cuda", 0), dtype)
    assert peak == tflops * 1e12 and name in source


def test_cpu_peak_is_a_short_matmul_measurement():
    """Under a second on an idle core; 2 s leaves room for a loaded CI machine."""
    utils = import_step("step3", "utils")
    start = time.perf_counter()
    peak, source = utils.peak_flops_per_device(torch.device("cpu"), torch.bfloat16)
    assert time.perf_counter() - start < 2
    assert 1e9 < peak < 1e15 and "fp32 matmul" in source  # a CPU core does a few GFLOP/s at the very least
    assert utils.peak_flops_per_device(torch.device("cpu"), torch.float32, peak_tflops=2.5) == (2.5e12, "--peak_tflops")


@pytest.fixture(scope="module")
def runs(torchrun):
    """The fp32 baseline and the bf16 layouts, two launches at a time (start-up overlaps well)."""
    launches = {"fp32": ("step3", 1, *FP32_BASELINE)}
    launches.update({step: (step, nproc, *BF16, *layout) for step, (nproc, layout) in BF16_LAYOUTS.items()})
    result = torchrun.many(launches)
    for run in result.values():
        assert run.returncode == 0, run
    return result


@pytest.mark.parametrize("step", list(BF16_LAYOUTS))
def test_bf16_on_cpu_trains_close_to_fp32(runs, step):
    """bf16 weights and activations, fp32 loss (and fp32 gradient buckets in step 6): steps 3 (1 process),
    6 (dp 2) and 8 (pp 2, 1F1B) against the fp32 single-process run of the same global batch (which every
    fp32 layout reproduces to 1e-5, tests/test_*_parallel.py).
    Measured on the CPU (10 steps with the default warm-up, cosine and clipping, loss 8.36 -> 7.33): |dloss|
    3.5e-4 at step 1 (bf16 rounding of the same weights), at most 3.8e-3 (step 3), 3.5e-3 (step 6), 3.6e-3
    (step 8) over the 10 steps, as the rounding of the updates accumulates. Tolerances: 1e-3 at step 1 and 1e-2
    throughout, two to three times the measured gaps and well under the 1.0 the loss falls; a loss or a gradient
    sum kept in bf16 would move the loss by more (bf16 spaces values near 8 by 0.03)."""
    bf16, fp32 = runs[step].losses, runs["fp32"].losses
    assert len(bf16) == 10 and all(math.isfinite(loss) for loss in bf16)
    assert bf16[-1] < bf16[0] - 0.5, bf16
    assert abs(bf16[0] - fp32[0]) <= 1e-3, (bf16, fp32)
    assert max(abs(a - b) for a, b in zip(bf16, fp32)) <= 1e-2, (bf16, fp32)


@pytest.mark.parametrize("step", list(BF16_LAYOUTS))
def test_logged_mfu_is_tokens_per_second_times_flops_per_token_over_devices_and_peak(runs, step):
    run, world_size = runs[step], BF16_LAYOUTS[step][0]
    utils = import_step(step, "utils")
    flops_per_token = utils.flops_per_token(tiny_config(utils), 32)  # the whole model's, on every layout
    assert f"FLOPs per token: {utils.to_readable_format(flops_per_token)}" in run.stdout
    assert f"peak per device: {PEAK_TFLOPS:.3f} TFLOPs (--peak_tflops)" in run.stdout
    for m in run.metrics:
        achieved = m["tokens_per_second"] * flops_per_token / world_size
        assert m["tflops_per_device"] == pytest.approx(achieved / 1e12, rel=1e-12)
        assert m["mfu"] == pytest.approx(achieved / (PEAK_TFLOPS * 1e12), rel=1e-12)
    logged = [float(mfu) / 100 for mfu in re.findall(r"\| MFU: ([\d.]+)% \|", run.stdout)]
    assert logged == pytest.approx([m["mfu"] for m in run.metrics], abs=6e-4)  # printed to 0.1%


@pytest.mark.parametrize("step", ["step3", "step8"])
def test_non_positive_peak_is_refused_before_training(monkeypatch, capsys, step):
    train = import_step(step, "train")
    monkeypatch.setattr(sys, "argv", ["train.py", "--peak_tflops", "0"])
    # main() sets these for its process: give this one its own back afterwards
    for name in ("OMP_NUM_THREADS", "TOKENIZERS_PARALLELISM"):
        monkeypatch.setenv(name, os.environ.get(name, ""))
    monkeypatch.setattr(torch, "set_num_threads", lambda threads: None)
    with pytest.raises(SystemExit) as exit_info:
        train.main()
    assert exit_info.value.code == 1
    assert "error: argument --peak_tflops: must be a positive number, got 0" in capsys.readouterr().err
