"""tools/benchmark_moe.py in its quick form (2 timed steps, an ep 2 run of 2 steps): our MoE Llama and transformers'
Mixtral take the same steps, the bytes expert parallelism hands to all-to-all are the step's formula, and each rank
holds its share of the experts. No timing is asserted."""
import json
import math
import subprocess
import sys

import pytest

from conftest import ROOT, run_env

# Largest per-step |loss difference|, ours vs transformers' MixtralForCausalLM: measured 0.0 over these 3 steps and
# 9.5e-7 at the tool's default batch (4 x 128; fp32, the experts' matmuls grouped differently): the parity contract's
# bound.
LOSS_TOLERANCE = 1e-4
KEYS = ("ours_step_s", "hf_step_s", "step_time_ratio", "cpu_time_ratio", "max_abs_dloss", "first_abs_dloss",
        "alltoall_bytes", "alltoall_bytes_formula", "alltoall_bytes_ratio", "alltoall_bytes_max",
        "alltoall_bytes_max_ratio", "expert_params_per_rank", "expert_params_total", "expert_params_share")
EP_SIZE, HIDDEN, LAYERS, EXPERTS, TOP_K, INTERMEDIATE = 2, 256, 4, 8, 2, 256  # assets/tiny_mixtral
EP_MICRO_BATCH, EP_SEQ, EP_GRAD_ACC = 2, 32, 2


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    command = [sys.executable, str(ROOT / "tools" / "benchmark_moe.py"), "--steps", "2", "--warmup", "1",
               "--seq_len", "64", "--ep_steps", "2", "--ep_micro_batch_size", str(EP_MICRO_BATCH), "--ep_seq_len",
               str(EP_SEQ), "--ep_grad_acc", str(EP_GRAD_ACC), "--json"]
    proc = subprocess.run(command, cwd=ROOT, env=run_env(tmp_path_factory.mktemp("benchmark_moe")),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


def test_keys_are_there_and_finite(result):
    for key in KEYS:
        assert isinstance(result[key], (int, float)) and math.isfinite(result[key]), (key, result.get(key))
    assert result["ours_step_s"] > 0 and result["hf_step_s"] > 0
    assert len(result["ours_losses"]) == len(result["hf_losses"]) == 3  # warm-up + 2 timed steps


def test_ours_and_transformers_take_the_same_steps(result):
    assert result["ours_losses"][0] > 8  # ln(4096) = 8.3 at random weights, + 0.02 x about 2: a real loss
    assert result["first_abs_dloss"] <= 1e-5
    assert result["max_abs_dloss"] <= LOSS_TOLERANCE, (result["ours_losses"], result["hf_losses"])
    assert result["max_abs_dloss"] == max(abs(a - b) for a, b in zip(result["ours_losses"], result["hf_losses"]))


def test_alltoall_bytes_are_the_formula(result):
    """expert_parallel.py's formula per rank and step: per layer and micro-batch 4 x tokens x k x hidden x 4 bytes
    + the E int64 counts. It is the mean over an ep group (what train.py logs), exactly; each rank hands on its own
    pairs and those its experts received, so one rank's bytes are that count, and the busiest rank's are above."""
    tokens = EP_MICRO_BATCH * EP_SEQ
    formula = (4 * tokens * TOP_K * HIDDEN * 4 + EXPERTS * 8) * LAYERS * EP_GRAD_ACC
    assert result["alltoall_bytes_formula"] == formula
    assert result["alltoall_bytes_per_step"] == [formula]  # 2 steps, the first left out
    assert abs(result["alltoall_bytes_ratio"] - 1) <= 0.05 and result["alltoall_bytes_ratio"] == 1.0
    assert result["alltoall_bytes_max"] > formula  # the routing of random weights is uneven
    assert result["alltoall_bytes_ranks"] == result["alltoall_bytes_rank_formula"]
    assert sum(result["alltoall_bytes_ranks"]) == EP_SIZE * formula
    for measured in result["alltoall_bytes_ranks"]:
        assert (measured - EXPERTS * 8 * LAYERS * EP_GRAD_ACC) % (HIDDEN * 4) == 0  # whole rows of fp32 values


def test_each_rank_holds_its_share_of_the_experts(result):
    total = LAYERS * EXPERTS * 3 * INTERMEDIATE * HIDDEN
    assert result["expert_params_total"] == total
    assert result["expert_params_per_rank"] == total // EP_SIZE
    assert result["expert_params_share"] == 1 / EP_SIZE
    assert result["expert_params_built"] == [total // EP_SIZE] * EP_SIZE
    rest = result["params_one_process"] - total  # attention, norms, routers, embedding, LM head: whole on each rank
    assert result["params_per_rank"] == [rest + total // EP_SIZE] * EP_SIZE
