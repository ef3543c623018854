"""The repository's root, and a step folder's modules made importable the way the step imports them."""
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent


def use_step(folder):
    """Put ROOT/folder first on sys.path, so that `import model` finds that step's model.py (every step imports its
    siblings as top-level modules). A tool calls it once, before importing the step's modules, and uses one step
    per process. Returns the folder's path."""
    path = ROOT / folder
    if not path.is_dir():
        raise FileNotFoundError(f"no step folder {path}")
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    return path
