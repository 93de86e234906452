"""`python -m minitron.export`."""

from __future__ import annotations

from minitron.common import format_table
from minitron.config import ModelConfig
from minitron.export.report import REPORT_COLUMNS
from minitron.export.stage import export

# The settings the command takes (minitron.cli): the model is --model.
CLI_KEYS = {"model": ("trust_remote_code",),
            "data": ("source", "text_field", "block_size", "eval_blocks"), "export": None}


def build_parser():
    import minitron.export
    from minitron import cli

    p = cli.stage_parser("python -m minitron.export", minitron.export.__doc__.splitlines()[0],
                         CLI_KEYS)
    p.add_argument("--model", default=ModelConfig.name, help="model folder, hub id or 'smollm2-135m'")
    p.add_argument("--output", required=True, help="output folder (new, empty, or a previous export)")
    return p


def main(argv: list[str] | None = None) -> int:
    import shlex
    import sys

    from minitron import cli

    args = cli.parse(build_parser(), argv)
    c = cli.configs(args)
    command = "python -m minitron.export " + shlex.join(sys.argv[1:] if argv is None else argv)
    report = export(args.model, args.output, c["export"], c["data"], command=command,
                    trust_remote_code=c["model"].trust_remote_code)
    print(format_table(report["table"], REPORT_COLUMNS))
    total = sum(t["wall_s"] for t in report["timing"])
    print(f"exported {report['deployed']} to {args.output} in {total:.0f}s "
          "(report.md, report.json, manifest.json)")
    return 0

