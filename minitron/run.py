"""`python -m minitron.run RECIPE [overrides] [--dry-run]`: see minitron/pipeline.py."""

from minitron.common import run_cli
from minitron.pipeline import main

if __name__ == "__main__":
    run_cli(main)
