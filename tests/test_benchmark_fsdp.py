"""Step 12's tools at a toy size (2 layers of hidden 64, dp 2): tools/benchmark_fsdp.py, where our ZeRO-3 and
PyTorch's FSDP2 take the same steps from the same weights, and tools/fsdp_timeline.py."""
import json
import subprocess
import sys
import warnings

from conftest import ROOT, run_env

# Largest per-step |loss difference|, ours vs FSDP2: measured 0.0 at this size and at the default 31.7M
# parameters (the same fp32 algorithm, the same summation on 2 ranks); held to the parity contract's 1e-5.
LOSS_TOLERANCE = 1e-5


def test_ours_and_fsdp2_take_the_same_steps(tmp_path):
    """A run whose worker dies with SIGABRT from a gloo thread ("terminate called without an active exception",
    seen under the load of a full suite, never alone) is run once more; its stderr is kept and reported."""
    command = [sys.executable, str(ROOT / "tools" / "benchmark_fsdp.py"), "--hidden_size", "64", "--intermediate_size",
               "128", "--num_hidden_layers", "2", "--steps", "2", "--json"]
    proc = subprocess.run(command, cwd=ROOT, env=run_env(tmp_path), capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "terminate called without an active exception" in proc.stderr:
        (tmp_path / "sigabrt_stderr.txt").write_text(proc.stderr)
        warnings.warn(f"benchmark_fsdp: a worker died with SIGABRT (stderr kept in {tmp_path}/sigabrt_stderr.txt); "
                      f"ran it again")
        proc = subprocess.run(command, cwd=ROOT, env=run_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert result["ours_step_s"] > 0 and result["torch_step_s"] > 0
    assert len(result["ours_losses"]) == len(result["torch_losses"]) == 3  # warm-up + 2 timed steps
    assert result["ours_losses"][0] > 5  # ln(512) = 6.2 at random weights: a real loss
    assert result["max_abs_dloss"] <= LOSS_TOLERANCE, (result["ours_losses"], result["torch_losses"])
    assert result["max_abs_dloss"] == max(abs(a - b) for a, b in zip(result["ours_losses"], result["torch_losses"]))


def test_the_timeline_tool_sees_the_layers_gathered_twice_and_at_most_two_units_in_memory(tmp_path):
    """tools/fsdp_timeline.py at toy size (2 layers: 4 units): each layer is gathered, waited for and freed once in
    forward and once in backward; the embedding only in forward (its backward reads no weight); the norm with the
    LM head once, whole from its forward to the end of its backward; at most two units hold their full buffer at
    any moment."""
    out = tmp_path / "timeline.png"
    command = [sys.executable, str(ROOT / "tools" / "fsdp_timeline.py"), "--hidden_size", "64", "--intermediate_size",
               "128", "--num_hidden_layers", "2", "--vocab_size", "512", "--seq_len", "32", "--out", str(out), "--json"]
    proc = subprocess.run(command, cwd=ROOT, env=run_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["units"] == ["embedding", "layer 0", "layer 1", "norm + LM head"]
    for unit in range(4):
        kinds = [what for index, what, _ in sorted(result["events"], key=lambda e: e[2]) if index == unit]
        assert kinds == ["gather", "whole", "free"] * (2 if unit in (1, 2) else 1), (unit, kinds)
    assert result["most_units_in_memory"] == 2
    assert out.stat().st_size > 10_000


def test_the_timeline_tool_sees_zero_1_gathers_started_by_the_step_and_waited_for_in_the_forward(tmp_path):
    """Issue 29, item 4: at stage 1 ZeroAdamW.step starts every bucket's all-gather, in the order the next forward uses
    the buckets, and waits for none; the forward waits for each just before its first use, in the same order."""
    out = tmp_path / "gathers.png"
    command = [sys.executable, str(ROOT / "tools" / "fsdp_timeline.py"), "--zero_stage", "1", "--bucket_size_mb",
               "0.02", "--hidden_size", "64", "--intermediate_size", "128", "--num_hidden_layers", "2", "--vocab_size",
               "512", "--seq_len", "32", "--out", str(out), "--json"]
    proc = subprocess.run(command, cwd=ROOT, env=run_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    buckets = len(result["units"])
    assert buckets >= 10 and result["units"][0].startswith("bucket 0: embed_tokens.weight")
    (step_start, step_end), (forward_start, forward_end) = result["phases"]["optimizer"], result["phases"]["forward"]
    events = sorted(result["events"], key=lambda event: event[2])
    started = [bucket for bucket, what, seconds in events if what == "gather" and step_start <= seconds <= step_end]
    waited = [bucket for bucket, what, seconds in events if what == "whole" and forward_start <= seconds <= forward_end]
    assert started == waited == list(range(buckets)), events
    assert out.stat().st_size > 10_000
