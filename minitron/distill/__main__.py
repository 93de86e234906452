"""`python -m minitron.distill` (and torchrun's `-m minitron.distill`)."""

from minitron.common import run_cli
from minitron.distill.command import main

if __name__ == "__main__":
    run_cli(main)
