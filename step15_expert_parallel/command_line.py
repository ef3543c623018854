"""The command line's parser and its argument types: each refuses a bad value with one clear line.
"""
import argparse
import math
import os

from utils import fail


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose complaints (an unknown flag, a value of the wrong type or range) are one `error:` line
    from one rank, like every other check, instead of a usage text from every rank."""

    def error(self, message):
        fail(f"{message} (see --help)")


def integer(minimum):
    """An argparse type: an integer >= minimum."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def finite_float(zero_allowed):
    """An argparse type: a finite number > 0, or >= 0 if zero_allowed."""
    def parse(text):
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (math.isfinite(value) and (value >= 0 if zero_allowed else value > 0)):
            raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}" if zero_allowed
                                             else f"must be a positive number, got {text}")
        return value
    return parse


positive_float = finite_float(zero_allowed=False)
non_negative_float = finite_float(zero_allowed=True)


def output_file(text):
    """An argparse type: a path a file can be written to (not an existing directory)."""
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a directory; give a file path")
    return text
