"""Alias for `python -m inference.benchmark` (same flags), for those who look for benchmarks in benchmarks/."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from inference.benchmark import main  # noqa: E402
from inference.cli import run_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_main(main))
