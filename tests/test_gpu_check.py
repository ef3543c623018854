"""tools/gpu_check.py at toy size on the CPU, so the GPU check cannot rot between GPU runs: two steps (one that
only prints, one with a metrics file) train in bf16, the logits check and the model benchmark run, and the
report says so."""
import re
import subprocess
import sys

from conftest import ROOT, run_env


def test_gpu_check_runs_at_toy_size_on_the_cpu(tmp_path):
    report = tmp_path / "report.md"
    command = [sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--device", "cpu", "--toy", "--steps", "1", "8",
               "--model_step", "8", "--report", str(report)]
    proc = subprocess.run(command, cwd=ROOT, env=run_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = report.read_text()
    assert re.search(r"\| step1_modeling \| 8\.\d+ \| [4-7]\.\d+ \| yes \| - \| - \|", text), text
    assert re.search(r"\| step8_pipeline_parallel_1f1b \| 8\.\d+ \| [67]\.\d+ \| yes \| \d+ \| [\d.]+% \|", text), text
    assert "max abs difference 0.00e+00 (tolerance 1e-04): pass" in text  # CPU against CPU: the same kernels
    for model in ("ours", "transformers"):
        assert re.search(rf"\| {model} \| \d+ \| [\d.]+% \| - \|", text), text
    assert float(re.search(r"ours / transformers: \*\*([\d.]+)x\*\*", text).group(1)) > 0


def test_gpu_check_refuses_unknown_steps(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--device", "cpu", "--steps", "99"],
                          cwd=ROOT, env=run_env(tmp_path), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "no step folder for [99]" in proc.stderr
