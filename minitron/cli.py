"""Stage commands generated from the config dataclasses.

A stage command takes its conventional path flags (`--model`, `--output`, ...), which each stage
adds itself, plus settings: `section.key=value` arguments converted by the recipe's own converter,
and the alias `--key-name VALUE` (`--key-name` / `--no-key-name` for a true/false key; a key name
that several sections share is the first section's alias). `--help` lists every key with its default, valid range and
documentation, all read from `minitron.config`. torchrun's child processes receive their settings
the same way (`as_overrides`). The console scripts in pyproject.toml are the functions at the end.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import textwrap
from typing import Any

import yaml

from minitron.common import DEBUG_FLAG, run_cli
from minitron.config import COMMAND_SECTIONS, SECTIONS, Section, docs
from minitron.recipe import RecipeError, build_section, parse_overrides

# Which keys of which sections a command exposes: None means every key but `enabled` (which only
# means something in a recipe).
Keys = dict[str, "tuple[str, ...] | None"]


def exposed(keys: Keys) -> list[tuple[str, dict[str, Any]]]:
    """(section, field doc) for every key a command exposes, in declaration order."""
    out = []
    for section, names in keys.items():
        for d in docs(COMMAND_SECTIONS[section]):
            if (names is None and d["key"] != "enabled") or (names is not None and d["key"] in names):
                out.append((section, d))
    return out


def _aliases(keys: Keys) -> dict[str, str]:
    """{'section.key': '--key-name'}; a key name in several sections is the first one's alias."""
    out: dict[str, str] = {}
    for s, d in exposed(keys):
        flag = "--" + d["key"].replace("_", "-")
        if flag not in out.values():
            out[f"{s}.{d['key']}"] = flag
    return out


def _show(value: Any) -> str:
    """`value` as it reads back through the converter: a plain string as itself, else JSON."""
    if isinstance(value, str) and value.strip() and yaml.safe_load(value) == value:
        return value
    return json.dumps([list(p) if isinstance(p, tuple) else p for p in value]
                      if isinstance(value, tuple) else value)


def recipe_parser(prog: str, description: str, recipe_help: str, debug_help: str,
                  dry_run_help: str) -> argparse.ArgumentParser:
    """The command line of a recipe-driven command (`minitron.run`, `minitron.sweep`): the recipe,
    `section.key=value` overrides, the debug flag and `--dry-run`; every recipe key in `--help`."""
    every_key = {s: tuple(d["key"] for d in docs(cls)) for s, cls in SECTIONS.items()}
    p = argparse.ArgumentParser(prog=prog, description=description, epilog=settings_help(every_key),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", help=recipe_help)
    p.add_argument("overrides", nargs="*", help="section.key=value, typed like the recipe")
    p.add_argument(DEBUG_FLAG, action="store_true", help=debug_help)
    p.add_argument("--dry-run", action="store_true", help=dry_run_help)
    return p


def settings_help(keys: Keys, aliases: dict[str, str] | None = None) -> str:
    """The settings part of `--help`: every key, its alias, default, valid range and doc."""
    aliases = aliases or {}
    lines = ["settings (section.key=value, typed like a recipe; default; valid):"]
    for section in keys:
        items = [d for s, d in exposed({section: keys[section]})]
        if not items:
            continue
        doc = (COMMAND_SECTIONS[section].__doc__ or "").strip()
        summary = " ".join(doc.split("\n\n")[0].split())
        lines.append("")
        lines += textwrap.wrap(f"{section}: {summary}", 98)
        for d in items:
            name = f"{section}.{d['key']}"
            alias = aliases.get(name)
            if alias and _is_bool(d["type"]):
                alias = f"{alias} / --no-{alias[2:]}"
            head = f"  {name}={_show(d['default'])}" + (f"  ({alias})" if alias else "")
            body = f"{d['doc']} Valid: {d['valid']}."
            lines.append(head)
            lines += textwrap.wrap(body, 96, initial_indent=" " * 6, subsequent_indent=" " * 6)
    return "\n".join(lines)


def _is_bool(tp) -> bool:
    """A true/false setting (also one that may be null: its flag sets true or false; null is
    `section.key=null`)."""
    return tp is bool or tp == (bool | None)


def stage_parser(prog: str, description: str, keys: Keys) -> argparse.ArgumentParser:
    """A parser with the settings of `keys`; the stage adds its path flags to it."""
    aliases = _aliases(keys)
    p = argparse.ArgumentParser(prog=prog, description=description,
                                epilog=settings_help(keys, aliases),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="settings, listed below")
    p.add_argument(DEBUG_FLAG, action="store_true",
                   help="print full tracebacks (of errors, and of failing torchrun ranks)")
    for section, d in exposed(keys):
        name = f"{section}.{d['key']}"
        if name not in aliases:
            continue
        if _is_bool(d["type"]):
            p.add_argument(aliases[name], dest=name, action=argparse.BooleanOptionalAction,
                           default=argparse.SUPPRESS, help=argparse.SUPPRESS)
        else:
            p.add_argument(aliases[name], dest=name, default=argparse.SUPPRESS, metavar="VALUE",
                           help=argparse.SUPPRESS)
    p.set_defaults(_keys=keys)
    return p


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    # Intermixed: `section.key=value` may stand before, between or after the flags.
    return parser.parse_intermixed_args(argv)


def configs(args: argparse.Namespace) -> dict[str, Section]:
    """The exposed sections, built from the defaults, the aliases and the overrides (in that
    order; a later value wins), through the recipe's own conversion."""
    keys: Keys = args._keys
    valid = {f"{s}.{d['key']}" for s, d in exposed(keys)}
    raw: dict[str, dict[str, Any]] = {section: {} for section in keys}
    flags = {name: v for name, v in vars(args).items() if name in valid}
    given = [(n, v) for n, v in flags.items() if not isinstance(v, str)]  # --flag / --no-flag
    given += parse_overrides([f"{n}={v}" for n, v in flags.items() if isinstance(v, str)])
    given += parse_overrides(args.overrides)
    for name, value in given:
        if name not in valid:
            section, _, key = name.partition(".")
            renamed = COMMAND_SECTIONS[section].renamed(key) if section in keys else None
            if renamed:
                raise RecipeError(f"command line: {name}: {renamed}")
            close = difflib.get_close_matches(name, sorted(valid), n=1)
            hint = f"did you mean '{close[0]}'? " if close else ""
            raise RecipeError(f"command line: {name}: unknown key; {hint}valid keys: "
                              f"{', '.join(sorted(valid))} (see --help)")
        section, key = name.split(".", 1)
        raw[section][key] = value
    return {section: build_section(COMMAND_SECTIONS[section], raw[section], section, "command line")
            for section in keys}


def as_overrides(sections: dict[str, Section], keys: Keys) -> list[str]:
    """`section.key=value` arguments that rebuild the exposed keys of `sections` exactly (what
    torchrun's child processes receive)."""
    return [f"{s}.{d['key']}={_show(sections[s].to_dict()[d['key']])}" for s, d in exposed(keys)]


# ----------------------------------------------------------------------------- console scripts
def _script(module: str):
    def entry() -> None:
        run_cli(importlib.import_module(module).main)
    entry.__doc__ = f"The installed command for `python -m {module}` (one-line errors, exit 2)."
    return entry


run = _script("minitron.pipeline")
prune = _script("minitron.prune")
distill = _script("minitron.distill")
export = _script("minitron.export")
evaluate = _script("minitron.evaluate")

__all__ = ["Keys", "as_overrides", "configs", "exposed", "parse",
           "settings_help", "stage_parser"]
