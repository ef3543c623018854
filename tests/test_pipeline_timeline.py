"""tools/pipeline_timeline.py on a tiny pp 2 run: it records every stage's forwards and backwards from a real
1F1B run, finds the schedule's order in them, measures idle fractions and the micro-batches held, and draws."""
import json
import subprocess
import sys

from conftest import ROOT, run_env


def test_timeline_of_a_pp2_1f1b_run(tmp_path):
    command = [sys.executable, str(ROOT / "tools" / "pipeline_timeline.py"), "--pp_size", "2",
               "--gradient_accumulation_steps", "4", "--micro_batch_size", "1", "--seq_len", "32", "--steps", "2",
               "--engines", "1f1b", "--output", str(tmp_path / "timeline.png"), "--json", str(tmp_path / "t.json")]
    proc = subprocess.run(command, cwd=ROOT, env=run_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (tmp_path / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    summary = json.loads((tmp_path / "t.json").read_text())
    assert summary["ideal_bubble"] == 1 / 5  # (p - 1) / (m + p - 1) with p = 2, m = 4
    stages = summary["1f1b"]["stages"]
    # 1F1B: stage 0 warms up with one extra forward, then alternates; the last stage alternates from the start
    assert [row["order"] for row in stages] == ["F0 F1 B0 F2 B1 F3 B2 B3", "F0 B0 F1 B1 F2 B2 F3 B3"]
    assert [row["peak_held"] for row in stages] == [2, 1]  # pp_size - pp_rank, as VERBOSE's count
    for row in stages:
        assert 0 < row["busy_seconds"] < summary["1f1b"]["step_seconds"]
        assert 0 < row["idle_fraction"] < 1
        assert f"stage {row['stage']}: idle {row['idle_fraction']:6.1%} (ideal 20.0%)" in proc.stdout
