"""Every step folder has a README.md in the common format, and it stays true to its step's code.

The format (step 1's to step 8's follow it; later steps must too):

    # Step N: title
    ## What it adds
    ## Reading order
    ## Run it
    ## What to look for

In "Reading order", a `backticked` word that looks like a file (`tensor_parallel.py`,
`patch_step_4.diff`) must be a file of the step, one that looks like a flag (`--bucket_size_mb`) a flag
of its train.py, and one that looks like a name must be in the step's code: `Class.method` a method
of that class, `obj.attr` two names the code uses, any other name a function, class, variable,
attribute, argument or string key. Snippets and shapes (`[batch, seq, hidden]`, `2 x cp_size`) are not
checked.

Every torchrun command in a step README goes through the argument parser of the train.py it runs, with
--nproc_per_node equal to the product of the parallel sizes (tp, pp, dp, and cp where the parser has
it); "Run it" runs the step's own train.py.

Deep dives live in the step READMEs and the top-level README links to them, so in every README (the top-level one
included) each relative link and image reaches a file and each #anchor a heading, each `tests/...py` it names is a
test file, and the top-level step table links every step's README.
"""
import ast
import re
import shlex
import sys

import pytest

from conftest import ROOT, import_step

STEP_DIRS = sorted((d for d in ROOT.glob("step*_*") if d.is_dir() and re.fullmatch(r"step\d+_\w+", d.name)),
                   key=lambda d: int(re.match(r"step(\d+)", d.name).group(1)))
HEADINGS = ["## What it adds", "## Reading order", "## Run it", "## What to look for"]
COMMAND = re.compile(r"torchrun --nproc_per_node \d+ [^`\n|]*?train\.py[^`\n|]*")
NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)?")


def step_number(step_dir):
    return int(re.match(r"step(\d+)", step_dir.name).group(1))


def readme(step_dir):
    path = step_dir / "README.md"
    assert path.is_file(), f"{step_dir.name} has no README.md"
    return path.read_text()


def section(text, heading):
    match = re.search(rf"^{re.escape(heading)}\n(.*?)(?=^## |\Z)", text, flags=re.MULTILINE | re.DOTALL)
    assert match, f"no {heading!r} section"
    return match.group(1)


def names_in(path):
    """Every name a file's code uses or defines, and its methods as Class.method."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names.update(f"{node.name}.{item.name}" for item in node.body
                         if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)))
        names.update(value for kind, field in ((ast.Name, "id"), (ast.Attribute, "attr"), (ast.arg, "arg"),
                                               (ast.keyword, "arg"), (ast.Constant, "value"))
                     if isinstance(node, kind) and isinstance(value := getattr(node, field), str) and value.isidentifier())
    return names


@pytest.mark.parametrize("step_dir", STEP_DIRS, ids=lambda d: d.name)
def test_readme_has_the_common_format(step_dir):
    text = readme(step_dir)
    assert re.match(rf"# Step {step_number(step_dir)}: \S", text), text.splitlines()[0]
    positions = [text.find(f"\n{heading}\n") for heading in HEADINGS]
    assert all(p > 0 for p in positions) and positions == sorted(positions), (step_dir.name, positions)


@pytest.mark.parametrize("step_dir", STEP_DIRS, ids=lambda d: d.name)
def test_reading_order_names_what_the_step_has(step_dir):
    text = section(readme(step_dir), "## Reading order")
    if step_number(step_dir) > 1:
        assert f"`patch_step_{step_number(step_dir)}.diff`" in text.split("\n2.")[0], "the reading starts at the patch"
    scope = set().union(*(names_in(p) for p in step_dir.glob("*.py")))
    flags = set(re.findall(r"add_argument\(\"(--\w+)\"", (step_dir / "train.py").read_text()))
    checked = 0
    for word in re.findall(r"`([^`]+)`", text):
        if re.fullmatch(r"[\w.]+\.(py|diff)", word):
            assert (step_dir / word).is_file(), f"{step_dir.name} has no {word}"
        elif re.fullmatch(r"--\w+", word):
            assert word in flags, f"{step_dir.name}/train.py has no flag {word}"
        elif NAME.fullmatch(word):
            head = word.split(".")[0]
            if "." in word and not any(name.startswith(f"{head}.") for name in scope):  # obj.attr, not Class.method
                assert set(word.split(".")) <= scope, f"{word!r} is not in {step_dir.name}'s code"
            else:
                assert word in scope, f"{word!r} is not in {step_dir.name}'s code"
        else:
            continue
        checked += 1
    assert checked >= 5, f"the reading order of {step_dir.name} names only {checked} things"


def readme_commands(step_dir):
    path = step_dir / "README.md"  # a missing README fails test_readme_has_the_common_format, not collection
    return [c.strip() for c in COMMAND.findall(path.read_text())] if path.is_file() else []


@pytest.mark.parametrize("step_dir", STEP_DIRS, ids=lambda d: d.name)
def test_run_it_runs_this_step(step_dir):
    commands = COMMAND.findall(section(readme(step_dir), "## Run it"))
    assert any(f" {step_dir.name}/train.py" in c for c in commands), commands


@pytest.mark.parametrize("step_dir, command", [(d, c) for d in STEP_DIRS for c in readme_commands(d)],
                         ids=lambda x: getattr(x, "name", None) or " ".join(str(x).split()[2:6]))
def test_readme_command_parses_with_a_consistent_process_count(step_dir, command, monkeypatch):
    words = shlex.split(command)
    nproc, script, args = int(words[2]), words[3], words[4:]
    assert (ROOT / script).is_file(), script
    train = import_step(re.match(r"(step\d+)_", script).group(1), "train")
    monkeypatch.setattr(sys, "argv", [script, *args])
    parsed = train.parse_args()
    sizes = [getattr(parsed, f"{kind}_size", 1) for kind in ("tp", "pp", "dp", "cp")]
    assert nproc == sizes[0] * sizes[1] * sizes[2] * sizes[3], (command, sizes)


@pytest.mark.parametrize("step_dir", STEP_DIRS, ids=lambda d: d.name)
def test_tools_a_readme_names_exist(step_dir):
    for tool in re.findall(r"tools/\w+\.py", readme(step_dir)):
        assert (ROOT / tool).is_file(), tool


def test_the_videos_section_maps_every_step_folder_to_a_video_or_to_its_readme():
    videos = section((ROOT / "README.md").read_text(), "## Videos")
    assert "https://www.youtube.com/playlist?list=PL-_armZiJvAnhcRr6yTJ0__f3Oi-LLi9S" in videos
    for video in ("u2VSwDDpaBM", "qUMPaSWi5HI", "_8xlRgFY_-g", "k8EpWveM_t4"):  # parts 1, 2, bonus, 3
        assert video in videos, video
    for step_dir in STEP_DIRS:
        assert f"]({step_dir.name}/README.md)" in videos, f"the Videos section does not link {step_dir.name}"


MARKDOWN_FILES = [ROOT / "README.md", *(d / "README.md" for d in STEP_DIRS)]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def without_code_blocks(text):
    return re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)


def anchors(path):
    """GitHub's heading anchors: lowercased, punctuation dropped (backticks included), spaces as hyphens."""
    headings = re.findall(r"^#{1,6} (.+)$", without_code_blocks(path.read_text()), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("path", MARKDOWN_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_images_resolve(path):
    """Sections move between the top-level README and the step READMEs: every relative link and image must still
    reach a file, and every #anchor a heading of the file it names."""
    for target in LINK.findall(without_code_blocks(path.read_text())):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        assert linked.exists(), f"{path.relative_to(ROOT)} links {target}: no such file"
        if anchor:
            assert anchor in anchors(linked), f"{path.relative_to(ROOT)} links {target}: no such heading"


@pytest.mark.parametrize("path", MARKDOWN_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_test_files_a_readme_names_exist(path):
    """`tests/test_x.py` (or a glob such as `tests/test_checkpoint*.py`) named in a README is a file of the suite, so
    that its advice on running one area's tests stays true."""
    for name in re.findall(r"tests/[\w*]+\.py", path.read_text()):
        assert list(ROOT.glob(name)), f"{path.relative_to(ROOT)} names {name}: no such test file"


def test_the_step_table_links_every_step_readme():
    """The top-level README is the map: each step's row of its table links that step's README (in the technique
    column, since tools/make_patches.py finds a row by its first cell, `stepN_name/` in backticks)."""
    readme = (ROOT / "README.md").read_text()
    for step_dir in STEP_DIRS:
        row = re.search(rf"^\| `{step_dir.name}/` \|.*$", readme, flags=re.MULTILINE)
        assert row, f"the step table has no row for {step_dir.name}"
        assert f"]({step_dir.name}/README.md)" in row.group(0), f"the row of {step_dir.name} does not link its README"
