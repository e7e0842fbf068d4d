"""Shared command-line plumbing: one-line errors and exit code 2 for bad input, never a traceback."""
import argparse
import sys


class UsageError(Exception):
    """Bad command-line input (missing file, wrong folder, ...). The message names the problem and the fix."""


class DataError(Exception):
    """The run cannot go on (bad data under --strict: the message starts with FILE:LINE). Exit code 1."""


class OneLineArgumentParser(argparse.ArgumentParser):
    """argparse prints a usage block before its error; we want exactly one error line (and exit 2)."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def run_main(main, argv=None) -> int:
    """Run `main(argv)`, turning our expected failures into one `error: ...` line on stderr."""
    try:
        return main(argv) or 0
    except UsageError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: finished shards are kept; rerun the same command to resume", file=sys.stderr)
        return 130
