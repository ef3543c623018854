"""What the logging rank measures and reports: FLOPs per token and a device's peak (MFU), memory, readable numbers,
and the per-step metrics to a JSON Lines file and Weights & Biases.
"""
import json
import os
import resource
import time

import torch

from moe import active_mlp_params


def peak_memory_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6  # Linux reports kB


def flops_per_token(config, seq_len):
    """Training FLOPs per token of the whole model (not this rank's shard), by the PaLM convention
    (Chowdhery et al. 2022, appendix B): 6 * N + 12 * L * h * s. N counts the matmul weights (q, k, v, o,
    gate, up, down of every layer, and the LM head; not the embedding table, a lookup, nor the norms): 2
    FLOPs per weight and token forward, 4 backward (the input's gradient and the weight's). 12 * L * h * s
    is attention's two matmuls, q @ k^T and scores @ v: 4 * h * s per token and layer forward, twice that
    backward, counted as if unmasked (a flash kernel skips the masked half; the convention ignores that).
    A mixture of experts (step 15) counts the weights a token goes through: k experts' and the router's."""
    h, layers, head_dim = config.hidden_size, config.num_hidden_layers, config.head_dim
    q_size, kv_size = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    attention = h * q_size + 2 * h * kv_size + q_size * h  # q, k, v, o
    mlp = active_mlp_params(config)  # gate, up, down (of k experts, and the router)
    matmul_params = layers * (attention + mlp) + h * config.vocab_size  # + lm_head
    return 6 * matmul_params + 12 * layers * h * seq_len


# Dense peak TFLOPs from the vendors' datasheets: (bf16/fp16 on tensor cores, fp32 without TF32, which is
# what PyTorch's fp32 matmuls use by default). The first name found in torch.cuda.get_device_name() wins,
# so the more specific names come first ("H100 PCIe" before "H100", "L40S" before "L4", "A100" before "A10").
GPU_PEAK_TFLOPS = [
    ("H100 PCIe", 756, 51), ("H100 NVL", 835, 60), ("H100", 989, 67), ("H200", 989, 67), ("A100", 312, 19.5),
    ("L40S", 362, 91.6), ("L4", 121, 30.3), ("A10", 125, 31.2), ("RTX 4090", 165, 82.6)]  # A10G: the A10's figures


def measure_matmul_flops(device, dtype, rounds=5, seconds=0.1, pause=0.05):
    """The best FLOPs/s of square matmuls, over `rounds` rounds of about `seconds` each with a pause between them:
    a practical peak where no datasheet applies. A neighbour busy for a moment slows some rounds, not all of them,
    and the best is kept. On a CPU it uses this process's torch.get_num_threads() threads, as training does."""
    size = 4096 if device.type == "cuda" else 1024  # big enough that a GPU's launch overhead is negligible
    generator = torch.Generator(device).manual_seed(0)  # leaves the training's random stream alone
    a, b = (torch.randn(size, size, device=device, dtype=dtype, generator=generator) for _ in range(2))
    torch.mm(a, b)  # warm-up: thread pools, kernel selection
    best = 0.0
    for _ in range(rounds):
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            torch.mm(a, b)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            best = max(best, 2 * size**3 / (time.perf_counter() - start))
        time.sleep(pause)
    return best


def peak_flops_per_device(device, dtype, peak_tflops=None):
    """(peak FLOPs/s of one device, where the figure comes from): --peak_tflops if given, else a known GPU's
    datasheet figure for dtype, else a short matmul measurement (fp32 on a CPU, whose bf16 matmuls are
    usually slower; the run's dtype on an unknown GPU)."""
    if peak_tflops:
        return peak_tflops * 1e12, "--peak_tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for pattern, bf16_tflops, fp32_tflops in GPU_PEAK_TFLOPS:
            if pattern in name:
                return (fp32_tflops if dtype == torch.float32 else bf16_tflops) * 1e12, f"{name} datasheet"
        return measure_matmul_flops(device, dtype), f"measured: {name} {dtype} matmul"
    return (measure_matmul_flops(device, torch.float32),
            f"measured: fp32 matmul on {torch.get_num_threads()} CPU thread(s)")


def to_readable_format(num, precision=2):
    for limit, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(num) >= limit:
            return f"{num / limit:.{precision}f}{suffix}"
    return f"{num:.{precision}f}"


def wandb_mode():
    """WANDB_MODE if set; else 'online' when W&B credentials are configured (WANDB_API_KEY or a netrc
    entry), and 'offline' when not: no login prompt, no network."""
    netrc_path = os.environ.get("NETRC", os.path.expanduser("~/.netrc"))
    logged_in = bool(os.environ.get("WANDB_API_KEY"))
    if not logged_in and os.path.exists(netrc_path):
        with open(netrc_path) as netrc:
            logged_in = "wandb" in netrc.read()
    return os.environ.get("WANDB_MODE") or ("online" if logged_in else "offline")


class MetricsLogger:
    """Per-step numbers to a JSON Lines file (--metrics_file) and to Weights & Biases (--use_wandb)."""

    def __init__(self, metrics_file=None, use_wandb=False, run_name=None, config=None):
        self.file = None
        if metrics_file:
            os.makedirs(os.path.dirname(os.path.abspath(metrics_file)), exist_ok=True)
            self.file = open(metrics_file, "w")
        self.wandb = None
        if use_wandb:
            import wandb

            mode = wandb_mode()
            if mode == "offline":
                print("wandb: no credentials found, logging offline (upload later with `wandb sync`)", flush=True)
            self.wandb = wandb.init(project="picotron_tutorial", name=run_name, config=config, mode=mode)

    def log(self, metrics):
        if self.file:
            self.file.write(json.dumps(metrics) + "\n")
            self.file.flush()
        if self.wandb:
            self.wandb.log(metrics, step=metrics["step"])

    def close(self):
        if self.file:
            self.file.close()
        if self.wandb:
            self.wandb.finish()
