"""`python -m minitron.export`."""

from minitron.common import run_cli
from minitron.export.command import main

if __name__ == "__main__":
    run_cli(main)
