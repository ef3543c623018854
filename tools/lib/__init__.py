"""What the tools share, imported as `from lib.<module> import ...` (a tool run as `python tools/<tool>.py` has
tools/ first on sys.path). No tool imports another tool.

    steps.py    ROOT, use_step(folder): a step folder's modules importable as the step imports them
    models.py   the model-size flags and the Llama config they make
    measure.py  random batches, activation bytes, peak memory, the CPU's name, a free port
    watch.py    watching step code run from the outside (Python's profiler hook): calls of chosen functions,
                returns from a chosen file; nothing watched is replaced
"""
