"""The step patches are exactly what tools/make_patches.py makes from the step folders now."""
import shutil
import subprocess
import sys

from conftest import ROOT


def test_patches_are_current():
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "make_patches.py"), "--check"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_a_stale_patch_is_reported(tmp_path):
    """--check must fail when a patch does not match its folders: edit a copy of the steps."""
    for folder in ROOT.glob("step*_*"):
        shutil.copytree(folder, tmp_path / folder.name, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "tools").mkdir()
    shutil.copy(ROOT / "tools" / "make_patches.py", tmp_path / "tools")
    check = [sys.executable, str(tmp_path / "tools" / "make_patches.py"), "--check"]
    assert subprocess.run(check, capture_output=True, timeout=60).returncode == 0
    model = tmp_path / "step4_tensor_parallel" / "model.py"
    model.write_text(model.read_text() + "\n# an edit the patches do not know about\n")
    proc = subprocess.run(check, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "step4_tensor_parallel/patch_step_4.diff" in proc.stdout
    assert "step5_data_parallel_naive/patch_step_5.diff" in proc.stdout  # the next step's patch too


def test_untracked_files_stay_out_of_the_patches(tmp_path):
    """What a run leaves in a step folder (wandb/, a metrics file) is not part of the step: in a git copy of the
    steps, an untracked file leaves every patch current, and the same file tracked makes them stale."""
    for folder in ROOT.glob("step*_*"):
        shutil.copytree(folder, tmp_path / folder.name, ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "tools").mkdir()
    shutil.copy(ROOT / "tools" / "make_patches.py", tmp_path / "tools")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["git", "add", "."], cwd=tmp_path, check=True)
    artifact = tmp_path / "step3_dataloader" / "wandb" / "offline-run-1" / "run.wandb"
    artifact.parent.mkdir(parents=True)
    artifact.write_text("written by a run\n")
    check = [sys.executable, str(tmp_path / "tools" / "make_patches.py"), "--check"]
    proc = subprocess.run(check, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    subprocess.run(["git", "add", str(artifact)], cwd=tmp_path, check=True)
    proc = subprocess.run(check, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "step3_dataloader/patch_step_3.diff" in proc.stdout, proc.stdout + proc.stderr


def test_line_counts_count_a_removed_line_that_starts_with_two_dashes():
    """A removed "--use_wandb) ..." line (step 3's docstring) shows as "---use_wandb) ..." in the diff; it is a
    removal, not a file header (patch 4 removes such a line, which a count by "---" prefix would miss)."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from make_patches import line_counts
    finally:
        sys.path.pop(0)
    patch = ("diff -ur a/x b/x\n--- a/x\n+++ b/x\n@@ -1,3 +1,3 @@\n context\n---max_tokens: a flag\n"
             "+++tokens: text that starts with two pluses\n-plain removal\n")
    assert line_counts(patch) == (1, 2)
    step4 = (ROOT / "step4_tensor_parallel" / "patch_step_4.diff").read_text()
    # every file header of a step patch names a step folder; every other line starting with "-" is a removal
    removals = sum(line.startswith("-") and not line.startswith("--- step") for line in step4.splitlines())
    assert "\n---use_wandb" in step4 and line_counts(step4)[1] == removals
