"""tools/pipeline_bubble.py on a tiny pp 2 run (4 micro-batches, fixed mode): it runs every schedule, reports one JSON
line each with the keys it documents and the theory's formula, and draws. No timing is asserted: how close the
measured bubble comes to the theory depends on the machine (the tool's table says it)."""
import json
import math
import subprocess
import sys

from conftest import ROOT, run_env

FORMULA = {"1f1b": 1 / 4, "interleaved_1f1b": 1 / 8, "zb_h1": 1 / 12}  # (p-1)/m, (p-1)/(v m), (p-1)/(3m): p 2, m 4, v 2
KEYS = {"engine", "pp_size", "virtual_pp_size", "micro_batches", "bubble_measured", "bubble_theory", "mode",
        "ratio_to_1f1b", "goal", "within_20pct"}


def test_bubble_tool_reports_every_schedule(tmp_path):
    command = [sys.executable, str(ROOT / "tools" / "pipeline_bubble.py"), "--pp_size", "2", "--micro_batches", "4",
               "--modes", "fixed", "--pass_seconds", "0.05", "--steps", "2", "--json",
               "--plot", str(tmp_path / "schedules.png")]
    proc = subprocess.run(command, cwd=ROOT, env=run_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "schedules.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert sorted(row["engine"] for row in rows) == sorted(FORMULA)
    for row in rows:
        assert KEYS <= set(row), KEYS - set(row)
        assert (row["mode"], row["pp_size"], row["micro_batches"]) == ("fixed", 2, 4)
        assert row["virtual_pp_size"] == (2 if row["engine"] == "interleaved_1f1b" else 1)
        assert math.isclose(row["bubble_theory"], FORMULA[row["engine"]])
        assert math.isfinite(row["bubble_measured"]) and row["bubble_measured"] >= -0.05
        one_f_one_b = next(r for r in rows if r["engine"] == "1f1b")["bubble_measured"]
        assert math.isclose(row["ratio_to_1f1b"], row["bubble_measured"] / one_f_one_b)
        assert row["within_20pct"] == (abs(row["bubble_measured"] - row["bubble_theory"]) <= 0.2 * row["bubble_theory"])
        assert row["goal"].startswith("within 20% of theory")
