"""tools/sanity_check.py in a reduced form: the baseline, the 3D layout of the original sanity check and dp4,
5 steps each, must agree with the single-process baseline within the parity bound, and the tool must draw its
plot. (Its other layouts, tp4, pp4 1F1B and cp4, run the same code path of the tool; each is held to the baseline
by its own parity test: test_tensor_parallel, test_pipeline_parallel, test_context_parallel.)"""
import json
import subprocess
import sys

from conftest import GRAD_NORM_EVERY_STEP, ROOT, run_env


def test_sanity_check_tool_reduced(tmp_path):
    out_dir = tmp_path / "runs"
    command = [sys.executable, str(ROOT / "tools" / "sanity_check.py"), "--seq_len", "32", "--micro_batch_size", "4",
               "--gradient_accumulation_steps", "4", "--max_tokens", str(5 * 4 * 4 * 32), "--out_dir", str(out_dir),
               "--plot", str(tmp_path / "plot.png"), "--table", str(tmp_path / "table.md"),
               "--layouts", "baseline", "3d", "dp4"]
    proc = subprocess.run(command, cwd=ROOT, env=run_env(tmp_path), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("processes, 5 steps") == 3  # a progress line per layout

    rows = {row["layout"]: row for row in json.loads((out_dir / "summary.json").read_text())}
    assert sorted(rows) == ["3d", "baseline", "dp4"]
    base = [json.loads(line)["loss"] for line in (out_dir / "baseline.jsonl").read_text().splitlines()]
    assert base[-1] < base[0] - 0.5  # the runs learn, so agreeing is not trivial
    for name, row in rows.items():
        assert row["steps"] == 5
        assert row["step1_abs_dloss"] <= 1e-5, row
        assert row["max_abs_dloss"] <= 1e-4, row
        assert row["max_rel_dgrad_norm"] <= GRAD_NORM_EVERY_STEP, row
        # the summary is computed from the metrics files the runs wrote
        losses = [json.loads(line)["loss"] for line in (out_dir / f"{name}.jsonl").read_text().splitlines()]
        assert row["max_abs_dloss"] == max(abs(a - b) for a, b in zip(losses, base))

    table = (tmp_path / "table.md").read_text()
    assert table.count("\n") == 5 and "| 3d | 5 |" in table and "| dp4 | 5 |" in table
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
