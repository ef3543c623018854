from pathlib import Path

from setuptools import setup

# torch is left unpinned so GPU users get the CUDA build their machine needs.
requirements = [line.strip() for line in Path(__file__).with_name("requirements.txt").read_text().splitlines()
                if line.strip() and not line.startswith("#")]

setup(
    name="picotron_tutorial",
    version="0.1.0",
    description="Build a minimal distributed LLM training framework (Llama + 3D parallelism) step by step",
    python_requires=">=3.10",
    py_modules=[],  # the steps are run as scripts, not imported as a package
    install_requires=requirements,
    extras_require={"test": ["pytest", "matplotlib", "py-spy"]},
)
