"""tools/benchmark_zero.py at a toy size (dp 1 and 2, 2 layers of hidden 64): the bytes it reports are the ZeRO
accounting of step12_fsdp/zero.py (stages 0-2 are step 11's), exactly where padding allows, and our stage 1 takes
the same steps as PyTorch's ZeroRedundancyOptimizer + DDP."""
import json
import subprocess
import sys

import pytest

from conftest import ROOT, import_step, run_env

GRAD_ACC = 2
KEYS = {"contestant", "zero_stage", "dp_size", "dtype", "param_bytes", "grad_bytes", "optimizer_bytes", "bytes_sent",
        "step_seconds", "tokens_per_second", "losses", "expected_total_bytes", "in_flight_bytes",
        "peak_from_start_bytes", "runtime_bytes", "peak_above_runtime_bytes", "formula_bytes"}
# |loss difference| per step, our fp32 stage 1 vs PyTorch's ZeRO-1 at dp 2: measured 0.0 (the same steps bit
# for bit at this size; 1.8e-7 at dp 4 at the default size), held to the parity contract's first-step bound.
LOSS_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    # Buckets of 0.01 MB: several buckets even in this toy model, so stage 2 has buffers in flight.
    command = [sys.executable, str(ROOT / "tools" / "benchmark_zero.py"), "--dp_sizes", "1", "2", "--hidden_size",
               "64", "--intermediate_size", "128", "--num_hidden_layers", "2", "--steps", "1", "--bucket_size_mb",
               "0.01", "--gradient_accumulation_steps", str(GRAD_ACC), "--json"]
    proc = subprocess.run(command, cwd=ROOT, env=run_env(tmp_path_factory.mktemp("benchmark_zero")),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in proc.stdout.splitlines()]


def row(rows, zero_stage, dp_size, contestant="ours", dtype="bfloat16"):
    [match] = [r for r in rows if (r["contestant"], r["zero_stage"], r["dp_size"], r["dtype"]) ==
               (contestant, zero_stage, dp_size, dtype)]
    return match


def test_rows_and_keys(rows):
    # dp 1: our four stages; dp 2: also our fp32 stage 1 and PyTorch's ZeRO-1
    assert len(rows) == 4 + 6
    for r in rows:
        assert KEYS <= set(r), KEYS - set(r)
        assert r["step_seconds"] > 0 and r["tokens_per_second"] > 0
        assert len(r["losses"]) == 2  # warm-up + 1 timed step


def test_memory_per_rank(rows):
    stage0_dp1 = row(rows, 0, 1)
    num_buckets = stage0_dp1["num_buckets"]
    P, G, O = stage0_dp1["param_bytes"], stage0_dp1["grad_bytes"], stage0_dp1["optimizer_bytes"]
    num_params = stage0_dp1["num_params"]
    assert (P, G, O) == (2 * num_params, 4 * num_params, 12 * num_params)  # bf16, fp32, fp32 master + 2 moments

    # Parameters: whole on every rank at every stage; at dp 2 each bucket pads by at most 1 element.
    for dp_size in (1, 2):
        assert len({row(rows, stage, dp_size)["param_bytes"] for stage in (0, 1, 2)}) == 1
    padded = row(rows, 0, 2)["param_bytes"] // 2  # padded parameter count at dp 2
    assert 0 <= padded - num_params <= num_buckets

    # Optimizer state: halved at stages 1 and 2 at dp 2 (each rank owns half of every padded bucket).
    assert row(rows, 0, 2)["optimizer_bytes"] == 12 * padded
    assert row(rows, 1, 2)["optimizer_bytes"] == row(rows, 2, 2)["optimizer_bytes"] == 12 * padded // 2

    # Gradients: full fp32 buffers at stages 0 and 1; at stage 2 the owned half plus the full buffers of the
    # buckets in flight, at least one (the bucket backward fills) and at most MAX_REDUCTIONS_IN_FLIGHT + 1.
    max_in_flight = import_step("step12", "zero").MAX_REDUCTIONS_IN_FLIGHT + 1
    for dp_size, numel in ((1, num_params), (2, padded)):
        assert row(rows, 0, dp_size)["grad_bytes"] == row(rows, 1, dp_size)["grad_bytes"] == 4 * numel
        stage2 = row(rows, 2, dp_size)
        assert stage2["grad_shard_bytes"] == 4 * numel // dp_size
        in_flight = stage2["grad_bytes"] - stage2["grad_shard_bytes"]
        assert stage2["largest_bucket_bytes"] <= in_flight <= max_in_flight * stage2["largest_bucket_bytes"]

    # The formula column: stage 1 differs from P + G + O/N by the padding only.
    stage1 = row(rows, 1, 2)
    total = stage1["param_bytes"] + stage1["grad_bytes"] + stage1["optimizer_bytes"]
    assert stage1["expected_total_bytes"] == P + G + O / 2
    assert abs(total / stage1["expected_total_bytes"] - 1) < 0.01


def test_zero_3_memory_per_rank(rows):
    """Stage 3 at dp 2: every term halved (each unit padded by at most 1 element), the formula (P + G + O)/N
    within 1%, and beside it the whole units in flight: at least the largest unit's parameters, at most two
    units' parameters plus MAX_REDUCTIONS_IN_FLIGHT + 1 full gradient buffers."""
    stage0_dp1, stage3 = row(rows, 0, 1), row(rows, 3, 2)
    num_params, num_units = stage0_dp1["num_params"], stage3["num_buckets"]
    assert num_units == 4  # embedding, 2 layers, norm + LM head
    piece = stage3["param_bytes"] // 2  # elements each rank keeps of the bf16 parameters
    assert 0 <= 2 * piece - num_params <= num_units
    assert (stage3["grad_bytes"], stage3["optimizer_bytes"]) == (4 * piece, 12 * piece)
    total = stage3["param_bytes"] + stage3["grad_bytes"] + stage3["optimizer_bytes"]
    assert abs(total / stage3["expected_total_bytes"] - 1) < 0.01
    largest_unit = stage3["largest_bucket_bytes"] // 4  # elements
    max_reducing = import_step("step12", "zero").MAX_REDUCTIONS_IN_FLIGHT + 1
    assert 2 * largest_unit <= stage3["in_flight_bytes"] <= 2 * (2 * largest_unit) + max_reducing * 4 * largest_unit
    for stage in (0, 1, 2):
        assert row(rows, stage, 2)["in_flight_bytes"] is None


def test_bytes_sent(rows):
    for stage in (0, 1, 2, 3):
        assert row(rows, stage, 1)["bytes_sent"] == 0
    grads = row(rows, 0, 2)["grad_bytes"]  # padded fp32 gradients
    params = row(rows, 0, 2)["param_bytes"]  # padded bf16 parameters
    # ring, N = 2: an all-reduce sends the buffer once, a reduce-scatter or all-gather half of it
    assert row(rows, 0, 2)["bytes_sent"] == grads  # one all-reduce per step
    assert row(rows, 1, 2)["bytes_sent"] == grads // 2 + params // 2  # reduce-scatter, all-gather
    assert row(rows, 2, 2)["bytes_sent"] == GRAD_ACC * grads // 2 + params // 2  # a reduce-scatter per micro-batch
    # stage 3, per micro-batch: the parameters gathered twice (forward, backward), but for the embedding (its backward
    # reads no weight) and the norm with the LM head (whole from its forward into its backward), gathered once; the
    # gradients reduce-scattered. Each rank sends half of each full buffer, i.e. its piece: the row's param and grad
    # bytes, and for those two units (the tool's default vocabulary of 512, hidden 64, bf16) half their bf16 bytes.
    vocab, hidden = 512, 64
    embedding_piece, last_unit_piece = vocab * hidden * 2 // 2, (hidden + vocab * hidden) * 2 // 2
    stage3 = row(rows, 3, 2)
    assert stage3["bytes_sent"] == GRAD_ACC * (2 * stage3["param_bytes"] - embedding_piece - last_unit_piece
                                               + stage3["grad_bytes"])
    assert row(rows, 1, 2, contestant="torch", dtype="float32")["bytes_sent"] is None  # DDP's are not counted


def test_stage1_matches_pytorch_zero1(rows):
    ours = row(rows, 1, 2, dtype="float32")["losses"]
    theirs = row(rows, 1, 2, contestant="torch", dtype="float32")["losses"]
    assert max(abs(a - b) for a, b in zip(ours, theirs)) <= LOSS_TOLERANCE, (ours, theirs)
    assert ours[0] > 5  # ln(512) = 6.2 at random weights: a real loss, not a constant


def test_peak_from_start_is_measured_per_stage_beside_the_formula(rows):
    """Issue 29, item 2: every row of ours in the benchmark's dtype has the peak of a fresh run of its stage, built as
    train.py builds it (at this toy size the runtime dominates it: the ratios are for the README's 98.6M model),
    and the ZeRO paper's P + G + O for it; PyTorch's row and our fp32 pair have none."""
    for r in rows:
        if r["contestant"] == "ours" and r["dtype"] == "bfloat16":
            assert r["peak_from_start_bytes"] >= r["runtime_bytes"] > 100 * 2**20  # the interpreter and torch
            assert r["peak_above_runtime_bytes"] == r["peak_from_start_bytes"] - r["runtime_bytes"]
            P, G, O, N = 2 * r["num_params"], 4 * r["num_params"], 12 * r["num_params"], r["dp_size"]
            assert r["formula_bytes"] == (P + G + O, P + G + O / N, P + (G + O) / N, (P + G + O) / N)[r["zero_stage"]]
        else:
            assert r["peak_from_start_bytes"] is None and r["formula_bytes"] is None
