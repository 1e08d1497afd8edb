"""`python -m fastchat_data <command> [options]` (or `camelid-data`): the data tools' command
line, on camelid's one convention (fastchat_data/options.py).

Each command is a Python function (fastchat_data.commands.COMMANDS); its options are derived
from its signature, one per parameter, so the function and the command line cannot disagree:

- the annotation types the option (`Literal[...]`: a choice; `X | None`: may be unset with
  "none"); a `list` in an annotation is for Python callers only: on the command line several
  files are one comma-separated string;
- the default is the parameter's default; a parameter without one is a required option;
- the help text is the parameter's line in the "Options:" section of the function's docstring
  or, for the options most commands share, OPTION_HELP below (every option has one);
- the parameters before `*` may also be given without their flag, in order
  (`convert in.json out.json`).

Every option is parsed and checked before the command runs, so a misspelt flag never leaves an
output written with the defaults; errors are one line (`error: ...`, exit status 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import inspect
import re
import sys
import textwrap
import types
import typing

from .options import UsageError, build_parser, entry_point, normalize, option, parse

PROG = "python -m fastchat_data"

# the help of options most commands share; a docstring's "Options:" line overrides it
OPTION_HELP = {
    "data": 'input file(s): a JSON array, JSON Lines (.jsonl) or {"data": [...]} file; several '
    "as one comma-separated string (a name that exists whole is one file, commas and all)",
    "out": "the output file (.jsonl: JSON Lines, else a JSON array)",
    "to": "the output format",
    "fmt": "the input format (default: detected from each file's first record)",
    "strict": "stop at the first record that cannot be used, naming it, instead of skipping "
    "and counting it",
    "report": "also write the report as JSON to this file",
    "in_place": "allow --out to be an input file (the new file replaces it atomically)",
    "tokenizer": "a tokenizer folder (tokenizer.json, tokenizer_config.json, ...)",
    "template": "the conversation template: vicuna_v1.1, alpaca, qlora_oasst, chat_template "
    "(the tokenizer's own), or a YAML/JSON file of template fields",
    "max_length": "the most tokens a row may have; a longer conversation loses its end",
    "seed": "random seed",
    "cache_dir": "where tokenized sets are cached (default: $CAMELID_CACHE, else ~/.cache/camelid)",
    "num_proc": "processes that tokenize (used from 1,025 conversations on; at most the "
    "machine's CPUs)",
}


def _commands() -> dict:
    from .commands import COMMANDS  # imported when used: `--help` of one command needs one

    return COMMANDS


def docstring_options(doc: str | None) -> dict[str, str]:
    """The "Options:" section of a docstring: `name: text` lines, continued by deeper-indented
    lines."""
    lines = textwrap.dedent("\n".join((doc or "").split("\n")[1:])).split("\n")
    out, current, inside = {}, None, False
    for line in lines:
        if line.strip() == "Options:":
            inside = True
            continue
        if not inside:
            continue
        if not line.strip():
            break
        m = re.match(r"    (\w+): (.*)", line)
        if m and not line.startswith("     "):
            current = m.group(1)
            out[current] = m.group(2).strip()
        elif current is not None:
            out[current] += " " + line.strip()
    return out


def description(fn) -> str:
    """The docstring without its Options section: what `--help` says above the options."""
    doc = inspect.getdoc(fn) or ""
    return doc.split("\nOptions:")[0].strip()


def summary(fn) -> str:
    """The docstring's first sentence, on one line."""
    paragraph = " ".join(description(fn).split("\n\n")[0].split())
    return re.split(r"(?<=\.) ", paragraph)[0]


def command_line_type(hint):
    """`hint` without the members that are for Python callers only: lists and tuples (several
    files), `Any` (a loaded tokenizer)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        kept = [
            m
            for m in typing.get_args(hint)
            if typing.get_origin(m) not in (list, tuple) and m not in (list, tuple, typing.Any)
        ]
        return functools.reduce(lambda a, b: a | b, kept)
    return hint


@functools.cache
def options_class(fn) -> type:
    """The options of command `fn` as a dataclass (see the module doc)."""
    hints = typing.get_type_hints(fn)
    helps = {**OPTION_HELP, **docstring_options(fn.__doc__)}
    fields = []
    for p in inspect.signature(fn).parameters.values():
        if p.name not in helps:
            raise TypeError(f"{fn.__name__}({p.name}) has no help text: add it to its docstring")
        default = dataclasses.MISSING if p.default is inspect.Parameter.empty else p.default
        positional = p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        meta = option(default, helps[p.name], positional=positional)
        fields.append((p.name, command_line_type(hints[p.name]), meta))
    name = "".join(w.title() for w in fn.__name__.split("_")) + "Options"
    return dataclasses.make_dataclass(name, fields, kw_only=True)


def command_parser(name: str, fn):
    """The parser of command `name`, its usage line showing which options are required and
    which may go without their flag."""
    parser = build_parser(options_class(fn), prog=f"{PROG} {name}", description=description(fn))
    words = []
    for f in dataclasses.fields(options_class(fn)):
        action = parser._option_string_actions[f"--{f.name}"]
        value = f" {action.metavar}" if action.nargs != "?" else ""
        if f.metadata.get("positional"):
            words.append(f"[--{f.name}] {f.name.upper()}")
        elif f.default is dataclasses.MISSING:
            words.append(f"--{f.name}{value}")
        else:
            words.append(f"[--{f.name}{value}]")
    lines = [f"{PROG} {name}"]
    for word in words:  # wrapped between options, never inside one
        if len(lines[-1]) + 1 + len(word) > 100:
            lines.append("   ")
        lines[-1] += " " + word
    parser.usage = "\n".join(lines)
    return parser


def program_help() -> str:
    """The commands, then every command's options with their descriptions and defaults."""
    commands = _commands()
    width = max(map(len, commands)) + 2
    out = [
        f"usage: {PROG} <command> [options]   (or: camelid-data <command> [options])",
        "",
        "camelid's data tools: read, convert, clean, split and tokenize conversation data.",
        "Each command ends with a report (records read, written, dropped by reason, each input",
        "file, every lossy conversion); --report FILE also writes it as JSON. Options may be",
        "written --name value or --name=value; the first ones also without their flag, in order.",
        "",
        "commands:",
    ]
    for name, fn in commands.items():
        indent = " " * (width + 2)
        out.append(
            textwrap.fill(
                summary(fn), 100, initial_indent=f"  {name:<{width}}", subsequent_indent=indent
            )
        )
    out += ["", f"{PROG} <command> --help shows one command; all of them:"]
    for name, fn in commands.items():
        parser = command_parser(name, fn)
        formatter = parser._get_formatter()
        actions = [a for a in parser._actions if a.option_strings and a.dest != "help"]
        formatter.add_arguments([a for a in actions if a.help != argparse.SUPPRESS])
        head = textwrap.fill(f"{name}: {summary(fn)}", 100, subsequent_indent="    ")
        out += ["", head, formatter.format_help().rstrip("\n")]
    return "\n".join(out)


def _main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(program_help())
        return 0
    commands = _commands()
    name, rest = argv[0], argv[1:]
    fn = commands.get(name) or commands.get(name.replace("-", "_"))
    if fn is None:
        close = difflib.get_close_matches(name, list(commands), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UsageError(
            f"command line: unknown command {name!r}{hint}; the commands are "
            f"{', '.join(commands)} ({PROG} --help describes them)"
        )
    given = [a[2:].partition("=")[0] for a in normalize(rest) if a.startswith("--")]
    if twice := next((key for key in given if given.count(key) > 1), None):
        # argparse would keep the last one without a word
        raise UsageError(f"command line: --{twice} is given twice; give it once")
    parser = command_parser(name, fn)
    opts = parse(options_class(fn), rest, parser=parser)
    fn(**{f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)})
    return 0


main = entry_point(_main)
