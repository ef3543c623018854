"""Step 12, ZeRO-3 (fully sharded data parallelism): dp 2, dp 4, dp 2 x tp 2, dp 2 x pp 2 (1F1B) and dp 2 x cp 2
at --zero_stage 3 train the single-process run (the parity contract); at dp 2 stage 3 takes exactly the steps
of step 11's stage 2, and step 12's stages 0-2 are step 11's, bit for bit. What a rank holds between units and
in flight is checked from inside a run by tests/zero_check.py (tests/test_zero.py)."""
from concurrent.futures import ThreadPoolExecutor

import pytest

from conftest import assert_parity
from test_zero import BASELINE, COMMON, DP2, LAYOUTS, SHORT

FSDP_LAYOUTS = {
    "dp2": (2, *DP2),
    "dp4": (4, "--micro_batch_size", 1, "--gradient_accumulation_steps", 1, "--dp_size", 4),
    "dp2_tp2": (4, *DP2, "--tp_size", 2),
    "dp2_pp2_1f1b": (4, *DP2, "--pp_size", 2, "--pp_engine", "1f1b"),
    "dp2_cp2": (4, *DP2, "--cp_size", 2),
}


@pytest.fixture(scope="module")
def runs(torchrun):
    """Every launch of this module, two at a time; the baseline and step 11's runs are shared with
    tests/test_zero.py (the launcher caches them)."""
    launches = {"baseline": BASELINE,
                **{f"zero3_{name}": ("step12", nproc, *COMMON, *args, "--zero_stage", 3)
                   for name, (nproc, *args) in FSDP_LAYOUTS.items()},
                "step11_dp2_zero2": ("step11", *LAYOUTS["dp2_zero2"][:1], *COMMON, *LAYOUTS["dp2_zero2"][1:]),
                "step11_dp2_zero1": ("step11", *LAYOUTS["dp2_zero1"][:1], *COMMON, *LAYOUTS["dp2_zero1"][1:]),
                "step12_dp2_zero1": ("step12", 2, *COMMON, *DP2, *SHORT, "--zero_stage", 1)}

    def launch(item):
        name, (step, nproc, *args) = item
        return name, torchrun(step, nproc, *args)

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(launch, launches.items()))


@pytest.mark.parametrize("layout", FSDP_LAYOUTS)
def test_zero_3_matches_the_single_process_baseline(runs, layout):
    assert_parity(runs[f"zero3_{layout}"], runs["baseline"], steps=20)
    assert "zero stage 3" in runs[f"zero3_{layout}"].stdout


def test_zero_3_takes_the_steps_of_zero_2_bit_for_bit_at_dp_2(runs):
    """Stage 3 changes where the parameters live, not the arithmetic: gathering copies them exactly, and the
    gradients are reduce-scattered per micro-batch as at stage 2 (two ranks: one rounding per sum)."""
    stage2, stage3 = runs["step11_dp2_zero2"], runs["zero3_dp2"]
    assert stage2.returncode == 0, stage2
    assert stage3.returncode == 0, stage3
    assert len(stage3.losses) == 20 and stage3.losses == stage2.losses  # identical floats


def test_step_12_keeps_step_11s_stages_bit_for_bit(runs):
    step11, step12 = runs["step11_dp2_zero1"], runs["step12_dp2_zero1"]
    assert step12.returncode == 0, step12
    assert len(step12.losses) == 10 and step12.losses == step11.losses[:10]
