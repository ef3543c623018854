"""Regenerate stepN_*/patch_step_N.diff: what step N adds to step N-1.

Each patch is `diff -x '*.diff' -x __pycache__ --new-file -ur step{N-1}_* stepN_*` run from the
repository root, with the file timestamps dropped from the `---`/`+++` headers so a patch depends
only on the files' contents (a fresh clone gives the same bytes). Only the files git tracks count:
what a run leaves in a step folder (wandb/, runs/, a metrics file) is not part of the step. Outside a
git checkout (an exported copy) every file counts.

    python tools/make_patches.py          # rewrite the patches, and the +added / −removed column of the README's
                                          # step table from them
    python tools/make_patches.py --check  # exit 1 if any patch is stale
"""
import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def step_dirs():
    dirs = [d for d in ROOT.iterdir() if d.is_dir() and re.fullmatch(r"step\d+_\w+", d.name)]
    return sorted(dirs, key=lambda d: int(re.match(r"step(\d+)", d.name).group(1)))


def tracked_files(folder):
    """Paths relative to ROOT of the files git tracks in folder, or None outside a git checkout."""
    result = subprocess.run(["git", "ls-files", "-z", "--", folder.name], cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        return None
    return [path for path in result.stdout.split("\0") if path and (ROOT / path).is_file()]


def make_patch(previous, current):
    with tempfile.TemporaryDirectory() as copy:
        # diff two copies holding only the tracked files, so untracked ones cannot reach the patch
        for folder in (previous, current):
            paths = tracked_files(folder)
            if paths is None:
                shutil.copytree(folder, Path(copy) / folder.name)
                continue
            (Path(copy) / folder.name).mkdir()
            for path in paths:
                (Path(copy) / path).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(ROOT / path, Path(copy) / path)
        result = subprocess.run(["diff", "-x", "*.diff", "-x", "__pycache__", "--new-file", "-ur", previous.name,
                                 current.name], cwd=copy, capture_output=True, text=True)
    if result.returncode > 1:  # 0: identical, 1: differences, 2: trouble
        sys.exit(f"diff failed: {result.stderr}")
    return re.sub(r"^((?:---|\+\+\+) \S+)\t.*$", r"\1", result.stdout, flags=re.MULTILINE)


def line_counts(patch):
    """(added, removed) lines of a unified diff, counted inside its hunks: a removed line whose text starts with
    "--" shows as "---..." and is not a file header there (counting every "-" line but "---" missed it)."""
    added = removed = 0
    in_hunk = False
    for line in patch.splitlines():
        if line.startswith("diff "):
            in_hunk = False  # the next lines are the "---" / "+++" file headers
        elif line.startswith("@@"):
            in_hunk = True
        elif in_hunk and line.startswith("+"):
            added += 1
        elif in_hunk and line.startswith("-"):
            removed += 1
    return added, removed


STEP_ROW = re.compile(r"^(\| `(step\d+)_\w+/` \|.*\| )\+\d+ / −\d+ \|$", flags=re.MULTILINE)


def update_step_table(readme):
    """Rewrite the last column (+added / −removed) of every step row of the README's table from the patch files."""
    def counts(row):
        step = row.group(2)
        patch = next(ROOT.glob(f"{step}_*")) / f"patch_{step.replace('step', 'step_')}.diff"
        added, removed = line_counts(patch.read_text())
        return f"{row.group(1)}+{added} / −{removed} |"

    readme.write_text(STEP_ROW.sub(counts, readme.read_text()))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check that every patch is current")
    args = parser.parse_args()
    stale = []
    steps = step_dirs()
    for previous, current in zip(steps, steps[1:]):
        number = re.match(r"step(\d+)", current.name).group(1)
        path = current / f"patch_step_{number}.diff"
        patch = make_patch(previous, current)
        if args.check:
            if not path.exists() or path.read_text() != patch:
                stale.append(str(path.relative_to(ROOT)))
        else:
            path.write_text(patch)
            added, removed = line_counts(patch)
            print(f"wrote {path.relative_to(ROOT)}: +{added} / −{removed} lines")
    if not args.check:
        update_step_table(ROOT / "README.md")
    if stale:
        print("stale patches (run python tools/make_patches.py): " + ", ".join(stale))
        sys.exit(1)


if __name__ == "__main__":
    main()
