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
