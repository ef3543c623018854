"""tools/benchmark_activations.py at a toy size (the tiny Llama at micro-batch 1 x seq 64): the bytes autograd saves
for backward on each rank are step 13's accounting (formula_bytes), within 10%, for tp 1, 2 and 4 with and without
sequence parallelism under every --recompute mode, in fp32 and in bf16 (where RMSNorm keeps an fp32 copy of its
input unless it is recomputed); and the goals of issue 31 on bytes hold. Bytes are deterministic; times are not:
no assertion on them."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT, run_env

KEYS = {"tp_size", "sequence_parallel", "recompute", "activation_bytes", "formula_bytes", "step_s"}
LAYOUTS = [(1, False), (2, False), (2, True), (4, False), (4, True)]
MODES = ("none", "selective", "full")
TOY = ["--seq_len", "64", "--micro_batch_size", "1", "--json"]
FORMULA_TOLERANCE = 0.10
TP4_SP_BYTES, FULL_BYTES = 0.30, 0.25


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """fp32 at tp 1, 2 and 4, one timed step, and the plot; bf16 bytes only (a bf16 step is slow on a CPU without
    bf16 instructions) at tp 2 in 2 layers. The two runs side by side."""
    tmp = tmp_path_factory.mktemp("benchmark_activations")
    tool = str(ROOT / "tools" / "benchmark_activations.py")
    commands = {"float32": [sys.executable, tool, *TOY, "--steps", "1", "--plot", str(tmp / "activations.png")],
                "bfloat16": [sys.executable, tool, *TOY, "--steps", "0", "--dtype", "bfloat16", "--tp_sizes", "2",
                             "--num_hidden_layers", "2"]}
    procs = {dtype: subprocess.Popen(command, cwd=ROOT, env=run_env(tmp), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True) for dtype, command in commands.items()}
    rows = {}
    for dtype, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, stderr[-3000:]
        rows[dtype] = [json.loads(line) for line in stdout.splitlines()]
    rows["plot"] = tmp / "activations.png"
    return rows


def find(rows, tp, sp, mode):
    [match] = [r for r in rows if (r["tp_size"], r["sequence_parallel"], r["recompute"]) == (tp, sp, mode)]
    return match


def assert_within_formula(rows, hint=""):
    off = {(r["tp_size"], r["sequence_parallel"], r["recompute"]): r["activation_bytes"] / r["formula_bytes"]
           for r in rows if abs(r["activation_bytes"] / r["formula_bytes"] - 1) > FORMULA_TOLERANCE}
    assert not off, f"measured / formula outside 1 +- {FORMULA_TOLERANCE}: {off}{hint}"


def test_rows_and_keys(runs):
    rows = runs["float32"]
    assert sorted((r["tp_size"], r["sequence_parallel"], r["recompute"]) for r in rows) == sorted(
        (tp, sp, mode) for tp, sp in LAYOUTS for mode in MODES)
    for r in rows:
        assert KEYS <= set(r), KEYS - set(r)
        assert r["activation_bytes"] > 0 and r["formula_bytes"] > 0 and r["step_s"] > 0
        assert r["ranks_differ_bytes"] == 0  # every rank of a layout keeps the same bytes
    assert [r["step_s"] for r in runs["bfloat16"]] == [None] * len(runs["bfloat16"])  # --steps 0: not timed
    assert runs["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_fp32_rows_match_the_formula(runs):
    assert_within_formula(runs["float32"])


def test_bf16_rows_match_the_formula(runs):
    """bf16: the norms' fp32 copies (kept under none and full, recomputed under selective, under sequence
    parallelism too) are a fifth of a layer's bytes, so a norm that keeps them when it should not misses by ~10%."""
    assert len(runs["bfloat16"]) == 2 * len(MODES)
    assert_within_formula(runs["bfloat16"], hint=" (sequence parallel + selective high: does SequenceParallelRMSNorm"
                          " recompute its normalisation when self.recompute is set, as RMSNorm does?)")


def test_sequence_parallelism_divides_the_activations(runs):
    rows = runs["float32"]
    assert find(rows, 4, True, "none")["activation_bytes"] <= TP4_SP_BYTES * find(rows, 1, False, "none")[
        "activation_bytes"]
    for mode in MODES:  # and in every mode against tp 1 in the same mode
        assert find(rows, 4, True, mode)["activation_bytes"] <= TP4_SP_BYTES * find(rows, 1, False, mode)[
            "activation_bytes"]
        # without sequence parallelism the norms and the residual stream stay whole on every rank
        assert find(rows, 4, False, mode)["activation_bytes"] > find(rows, 4, True, mode)["activation_bytes"]


def test_recompute_modes_order(runs):
    for dtype in ("float32", "bfloat16"):
        rows = runs[dtype]
        for tp, sp in {(r["tp_size"], r["sequence_parallel"]) for r in rows}:
            none, selective, full = (find(rows, tp, sp, mode)["activation_bytes"] for mode in MODES)
            assert full <= FULL_BYTES * none, (dtype, tp, sp)
            assert full < selective < none, (dtype, tp, sp)
