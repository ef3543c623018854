"""Every torchrun command in the README parses, and its step table's line counts match the patches.

The commands' runs themselves are exercised elsewhere (the training, parallel-layout and sanity-check
tests); here each one goes through its step's own argument parser, as torchrun would start it, and
its process count must equal tp x cp x pp x dp.
"""
import re
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT, import_step, run_env

README = (ROOT / "README.md").read_text()
COMMANDS = sorted(set(re.findall(r"torchrun --nproc_per_node \d+ [^`\n|]*?train\.py[^`\n|]*", README)))


def test_readme_has_a_command_for_every_step():
    steps = {re.search(r"(step\d+)_", c).group(1) for c in COMMANDS}
    assert steps == {f"step{n}" for n in range(1, 16)}


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_parses(command, monkeypatch):
    words = shlex.split(command.strip().rstrip("\\"))
    nproc, script, args = int(words[2]), words[3], words[4:]
    assert (ROOT / script).is_file(), script
    step = re.search(r"(step\d+)_", script).group(1)
    train = import_step(step, "train")
    monkeypatch.setattr(sys, "argv", [script, *args])
    parsed = train.parse_args()
    layout = [getattr(parsed, f"{kind}_size", 1) for kind in ("tp", "cp", "pp", "dp")]
    assert nproc == layout[0] * layout[1] * layout[2] * layout[3], (command, layout)


def multi_node_launches():
    """{source: (nnodes, the torchrun words)} for the README's many-machines command and tools/slurm_3d.sbatch,
    their backslash-continued lines joined."""
    readme = re.search(r"torchrun --nnodes .*?train\.py.*?(?<!\\)\n", README.replace("\\\n", " "), flags=re.S).group(0)
    sbatch = (ROOT / "tools" / "slurm_3d.sbatch").read_text()
    nodes = int(re.search(r"^#SBATCH --nodes=(\d+)", sbatch, flags=re.M).group(1))
    srun = re.search(r"^srun (torchrun .*?)(?<!\\)\n", sbatch.replace("\\\n", " "), flags=re.M | re.S).group(1)
    readme_words = shlex.split(readme)
    return {"README": (int(readme_words[readme_words.index("--nnodes") + 1]), readme_words),
            "slurm_3d.sbatch": (nodes, shlex.split(srun))}


@pytest.mark.parametrize("source", ["README", "slurm_3d.sbatch"])
def test_multi_node_commands_parse_and_fill_their_nodes(source, monkeypatch):
    nnodes, words = multi_node_launches()[source]
    script = next(word for word in words if word.endswith("train.py"))
    nproc = int(words[words.index("--nproc_per_node") + 1])
    assert {"--rdzv_backend", "--rdzv_endpoint", "--rdzv_id"} <= set(words), words
    train = import_step(re.search(r"(step\d+)_", script).group(1), "train")
    monkeypatch.setattr(sys, "argv", words[words.index(script):])
    parsed = train.parse_args()
    assert nnodes * nproc == parsed.tp_size * parsed.pp_size * parsed.dp_size * getattr(parsed, "cp_size", 1)
    assert nproc % parsed.tp_size == 0  # tp groups stay inside a node
    # the original 3D run's global batch of 2 x 8 x 2 = 32 sequences
    assert parsed.micro_batch_size * parsed.gradient_accumulation_steps * parsed.dp_size == 32


def test_the_slurm_script_is_valid_bash():
    proc = subprocess.run(["bash", "-n", str(ROOT / "tools" / "slurm_3d.sbatch")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_step_table_line_counts_match_the_patches():
    rows = re.findall(r"^\| `(step\d+)_\w+/` \|.*\| \+(\d+) / −(\d+) \|$", README, flags=re.MULTILINE)
    assert len(rows) == len(list(ROOT.glob("step*_*"))) - 1  # every step from 2 on has a patch
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        from make_patches import line_counts
    finally:
        sys.path.pop(0)
    for step, added, removed in rows:
        folder = next(ROOT.glob(f"{step}_*"))
        patch = (folder / f"patch_{step.replace('step', 'step_')}.diff").read_text()
        assert (int(added), int(removed)) == line_counts(patch), step


def test_a_step_runs_from_inside_its_folder(tmp_path):
    """As in the original README: `cd step3_dataloader && torchrun --nproc_per_node 1 train.py ...`."""
    folder = next(ROOT.glob("step3_*"))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py",
               "--seq_len", "32", "--micro_batch_size", "2", "--gradient_accumulation_steps", "1", "--max_tokens", "128"]
    proc = subprocess.run(command, cwd=folder, env=run_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Step: 2 " in proc.stdout and "assets/tiny_llama" in proc.stdout


TOOLS = sorted(set(re.findall(r"python (tools/\w+\.py)", README)))


@pytest.mark.parametrize("tool", TOOLS)
def test_readme_tools_start(tool, tmp_path):
    """The benchmarks take minutes and are not run here; every tool the README names must at least import
    and parse its options (the patch, asset and sanity tools also run for real in other tests)."""
    proc = subprocess.run([sys.executable, str(ROOT / tool), "--help"], cwd=ROOT, env=run_env(tmp_path),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout


def test_readme_names_every_tool():
    assert {f"tools/{p.name}" for p in (ROOT / "tools").glob("*.py")} == set(TOOLS)


def test_the_readme_test_command_is_what_ci_runs():
    """The quick start's second command is the suite as CI runs it (.ci/run), so a learner's green run is CI's."""
    ci = re.search(r"^(python -m pytest .*)$", (ROOT / ".ci" / "run").read_text(), flags=re.MULTILINE).group(1)
    assert f'pip install -e ".[test]" && {ci}' in README, ci
