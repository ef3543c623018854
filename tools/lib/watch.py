"""Watching step code run, from the outside. Python's profiler hook (sys.setprofile) is told of every function call
and return in this thread; watch() passes on the ones a tool asks for: the calls of chosen functions, with their
arguments, and the returns from the functions of one source file, with their frame. There the tool reads what it
measures (a collective's tensor, a bucket's buffers). Nothing of the code watched is replaced or wrapped: it runs
as always, only slower while watched (every call in the thread goes through the hook), so the tools watch steps
they do not time.

One thread: the tools run on the CPU, where backward, its hooks and their collectives run in the thread that
called backward."""
import contextlib
import inspect
import sys


@contextlib.contextmanager
def watch(calls=None, returns=None):
    """calls: {function: on_call(arguments)}: on_call gets the function's arguments by parameter name each time the
    function starts (a decorated function is watched by its innermost function: torch.distributed wraps each
    collective in a logger). returns: (source file, on_return(frame)): on_return is called each time a function
    defined in that file returns (a generator: each time it yields), after its last line ran."""
    codes = {inspect.unwrap(function).__code__: on_call for function, on_call in (calls or {}).items()}
    source_file, on_return = returns or (None, None)

    def profile(frame, event, arg):
        if event == "call" and frame.f_code in codes:
            codes[frame.f_code](frame.f_locals)
        elif event == "return" and frame.f_code.co_filename == source_file:
            on_return(frame)

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        yield
    finally:
        sys.setprofile(previous)
