"""The checkpoint tests' runs that save (tests/test_checkpoint_*.py, tests/test_fsdp.py): their layouts, and the runs
themselves as fixtures of the whole session. conftest.py loads this file as a plugin, so each run is launched once,
whichever of those files asks for it first."""
import shutil

import pytest

from conftest import TRAINING_LOOP, concurrently

STEPS, SAVE_AT = 6, 3  # every run below trains 6 optimizer steps and saves at step 3 and at the end
# A global batch of 4 sequences; 3 layers rather than the tiny model's 4: pipeline stages split them unevenly (2 + 1),
# and an export must carry the override into its config.
# The training loop of the parity runs: the save at step 3 falls inside the 5 warm-up steps.
COMMON = ["--seq_len", 32, "--learning_rate", 1e-3, "--max_tokens", STEPS * 4 * 32, "--num_hidden_layers", 3,
          *TRAINING_LOOP]
LAYOUTS = {
    "baseline": (1, ["--micro_batch_size", 2, "--gradient_accumulation_steps", 2]),
    "tp2": (2, ["--micro_batch_size", 2, "--gradient_accumulation_steps", 2, "--tp_size", 2]),
    "dp2_bucket": (2, ["--micro_batch_size", 1, "--gradient_accumulation_steps", 2, "--dp_size", 2,
                       "--bucket_size_mb", 1]),
    "pp2_1f1b": (2, ["--micro_batch_size", 1, "--gradient_accumulation_steps", 4, "--pp_size", 2, "--pp_engine", "1f1b"]),
    "cp2_tp2": (4, ["--micro_batch_size", 2, "--gradient_accumulation_steps", 2, "--cp_size", 2, "--tp_size", 2]),
    "tp2_pp2": (4, ["--micro_batch_size", 2, "--gradient_accumulation_steps", 2, "--tp_size", 2, "--pp_size", 2,
                    "--pp_engine", "1f1b"]),
    "cp2_pp2": (4, ["--micro_batch_size", 2, "--gradient_accumulation_steps", 2, "--cp_size", 2, "--pp_size", 2,
                    "--pp_engine", "1f1b"]),
}
# Step 11: (layout, zero stage and dtype) -> launch arguments, each added to COMMON; saves at step 3 and 6.
ZERO_LAYOUTS = {
    "dp2_zero2": (2, [*LAYOUTS["dp2_bucket"][1], "--zero_stage", 2]),
    "bf16_dp2_zero1": (2, [*LAYOUTS["dp2_bucket"][1], "--zero_stage", 1, "--dtype", "bfloat16"]),
    "baseline": LAYOUTS["baseline"],
    "cp2_pp2_zero1": (4, [*LAYOUTS["cp2_pp2"][1], "--zero_stage", 1]),  # ZeRO-1 over the cp group of each stage
}


def halfway_copy(save_dir, target):
    """save_dir as a run that stopped after step 3 left it: the step-6 checkpoint is not there yet."""
    shutil.copytree(save_dir, target, ignore=shutil.ignore_patterns(f"step_{STEPS:06d}"))
    return target


@pytest.fixture(scope="session")
def full_runs(torchrun, tmp_path_factory):
    """Every layout's uninterrupted 6 steps, saving at step 3 and 6: name -> (run, save_dir)."""
    def launch(name):
        nproc, args = LAYOUTS[name]
        save_dir = tmp_path_factory.mktemp(f"ckpt_{name}")
        return name, (torchrun("step10", nproc, *COMMON, *args, "--save_dir", save_dir, "--save_every", SAVE_AT),
                      save_dir)

    return dict(concurrently(launch, LAYOUTS))


@pytest.fixture(scope="session")
def zero_runs(torchrun, full_runs, tmp_path_factory):
    """Step 11's uninterrupted runs that save, and its resumes from step 3: name or (saved in, resumed in) -> run
    (and save_dir for the uninterrupted ones). ("step10", "baseline") resumes step 10's baseline checkpoint."""
    def full(name):
        nproc, args = ZERO_LAYOUTS[name]
        save_dir = tmp_path_factory.mktemp(f"ckpt11_{name}")
        return name, (torchrun("step11", nproc, *COMMON, *args, "--save_dir", save_dir, "--save_every", SAVE_AT),
                      save_dir)

    saved = dict(concurrently(full, ["dp2_zero2", "bf16_dp2_zero1"]))
    saved["step10"] = full_runs["baseline"]

    def resume(pair):
        source, target = pair
        save_dir = halfway_copy(saved[source][1], tmp_path_factory.mktemp(f"resume11_{source}_{target}") / "ckpt")
        nproc, args = ZERO_LAYOUTS[target]
        return pair, torchrun("step11", nproc, *COMMON, *args, "--save_dir", save_dir, "--resume")

    resumed = dict(concurrently(resume, [("dp2_zero2", "dp2_zero2"), ("bf16_dp2_zero1", "bf16_dp2_zero1"),
                                         ("dp2_zero2", "baseline"), ("dp2_zero2", "cp2_pp2_zero1"),
                                         ("step10", "baseline")]))
    return {**saved, **resumed}
