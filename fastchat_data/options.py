"""One command-line convention for every camelid command, and one error boundary.

A command's options are the fields of a dataclass, each declared with `option(default,
help)` and typed by its annotation (`Literal[...]` for a fixed set of choices, `X | None` for
an option that may be unset). transformers' HfArgumentParser (the parser FastChat's train.py
uses) makes one `--flag` per field; this module adds what it lacks:

- every value, from the command line or from a YAML recipe, is converted and checked by one
  function (`convert`), with one-line messages that name the option;
- a bad command line raises `UsageError` (one line) instead of argparse's usage + exit;
- no prefix matching (`--lr` never silently sets `--lr_scheduler_type`); an unknown option
  says which known one is closest; `--key-name` is read as `--key_name`; `--x -1e-5` works;
- `--help` lists every option with its type, default and description, grouped by section
  when the options come from several dataclasses, and exits before anything is touched;
- fields marked `option(..., positional=True)` may also be given without their flag, in order;
- a flag declared `option(False, help, preset={"steps": 3, ...})` (a benchmark's --quick) sets
  those options' values when given, except the ones given on the command line too.

`entry_point(main)` is the boundary every command's `main` runs inside: an expected failure
(`InputError`: bad options, data, files or checkpoints) prints one line `error: ...` and exits
2; a run that stopped deliberately (`RunStopped`) prints its line and exits with its status;
a closed pipe (`... | head`) ends quietly; anything else keeps its traceback, because it is a
bug to report.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import functools
import os
import sys
import types
import typing
from dataclasses import MISSING, field, fields
from typing import Literal


class InputError(ValueError):
    """Bad input (options, data, files, checkpoints): one line, exit status 2."""

    exit_status = 2


class UsageError(InputError):
    """A command line or recipe that cannot be read."""


class RunStopped(RuntimeError):
    """A run that stopped on purpose (a signal, a non-finite step): its line, its status."""

    exit_status = 3


def option(
    default=MISSING, help: str = "", *, default_factory=MISSING, positional: bool = False, **meta
):
    """A dataclass field that is a command-line option: its default and its one-line help.
    `preset={name: value}` (a bool flag): what giving the flag sets, said in its help."""
    if meta.get("preset"):
        sets = " ".join(f"--{name} {value}" for name, value in meta["preset"].items())
        help = f"{help} (sets {sets}; those given too win)"
    metadata = {"help": help, "positional": positional, **meta}
    return field(default=default, default_factory=default_factory, metadata=metadata)


# --------------------------------------------------------------------------- values


def _union_members(hint) -> tuple:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def choices_of(hint) -> tuple | None:
    """The allowed values of a `Literal[...]` (or `Literal[...] | None`) annotation."""
    for member in _union_members(hint):
        if typing.get_origin(member) is Literal:
            return typing.get_args(member)
    return None


def _parse_bool(text: str, name: str) -> bool:
    low = text.strip().lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off"):
        return False
    raise UsageError(f"{name} expects True or False, got {text!r}")


def convert(name: str, hint, value):
    """`value` (text from the command line, or a YAML value) as the type `hint` declares, or a
    UsageError naming `name`. Text stays text for a str option (a path "5" is a path); "none"
    or "null" unsets an optional option."""
    members = _union_members(hint)
    optional = type(None) in members
    kinds = [m for m in members if m is not type(None)]
    literal = choices_of(hint)
    if isinstance(value, str) and optional and value.strip().lower() in ("none", "null"):
        return None
    if value is None:
        if optional:
            return None
        raise UsageError(f"{name} needs a value, got none")
    if literal is not None:
        text = value if isinstance(value, str) else str(value)
        for choice in literal:
            if text == str(choice):
                return choice
        raise UsageError(f"{name} {value!r} is not one of {', '.join(map(str, literal))}")
    if bool in kinds:
        if isinstance(value, bool):
            return value
        if isinstance(value, str):
            return _parse_bool(value, name)
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise UsageError(f"{name} expects True or False, got {value!r}")
    if str in kinds and isinstance(value, str):
        return value
    for kind in (int, float):
        if kind in kinds:
            if isinstance(value, bool):
                break
            if isinstance(value, int | float) and not isinstance(value, bool):
                if kind is int and isinstance(value, float) and not value.is_integer():
                    break
                return kind(value)
            if isinstance(value, str):
                try:
                    return kind(value.strip())
                except ValueError:
                    continue
    if dict in kinds and isinstance(value, dict):
        return value
    if str in kinds and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)  # a YAML number where text is expected (a version, a name)
    want = " or ".join(
        {int: "an integer", float: "a number", str: "text", dict: "a mapping"}.get(k, k.__name__)
        for k in kinds
    )
    hint_text = " (several files: one comma-separated string)" if isinstance(value, list) else ""
    raise UsageError(f"{name} expects {want}, got {value!r}{hint_text}")


def type_hints(cls) -> dict:
    return typing.get_type_hints(cls)


def unknown_option(
    name: str, known, where: str = "command line", *, noun: str = "option"
) -> UsageError:
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f" (did you mean {close[0]}?)" if close else ""
    return UsageError(f"{where}: unknown {noun} {name!r}{hint}")


# --------------------------------------------------------------------------- the parser


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written, then each option with its default (argparse's
    ArgumentDefaultsHelpFormatter, less defaults its help already states)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (
            "default" in text
            or action.required
            or action.default is argparse.SUPPRESS
            or not action.option_strings
            or action.default is None
        ):
            return text
        return f"{text} (default: %(default)s)"


def _list_element(hint):
    """The element type of a `list[X]` annotation (or None for anything else)."""
    if typing.get_origin(hint) is list:
        args = typing.get_args(hint)
        return args[0] if args else str
    return None


def _metavar(hint) -> str:
    literal = choices_of(hint)
    if literal is not None:
        return "{" + ",".join(map(str, literal)) + "}"
    kinds = set(_union_members(hint)) - {type(None)}
    for kind, metavar in ((bool, "BOOL"), (int, "INT"), (float, "FLOAT")):
        if kinds == {kind}:
            return metavar
    return "TEXT"


def normalize(argv: list[str]) -> list[str]:
    """--key-name as --key_name (torch's launcher passes --local-rank), and a value that
    starts with "-" joined to its key (--learning_rate -1e-5: argparse would take -1e-5 for
    an option)."""
    out: list[str] = []
    for arg in argv:
        if arg.startswith("--") and len(arg) > 2:
            key, eq, value = arg[2:].partition("=")
            arg = f"--{key.replace('-', '_')}{eq}{value}"
        elif (
            arg.startswith("-")
            and arg not in ("-h",)
            and out
            and out[-1].startswith("--")
            and len(out[-1]) > 2
            and "=" not in out[-1]
        ):
            out[-1] += f"={arg}"
            continue
        out.append(arg)
    return out


class _OneLineErrors:
    def error(self, message: str):
        message = " ".join(message.split())
        if message.startswith("argument --"):
            flag, _, rest = message[len("argument ") :].partition(": ")
            name = flag.split("/")[0].strip()[2:]
            message = rest if rest.startswith(name + " ") else f"{flag}: {rest}"
        raise UsageError(f"command line: {message}")


class _StrictArgumentParser(_OneLineErrors, argparse.ArgumentParser):
    pass


def _field_converter(name: str, hint):
    def converted(text: str):
        try:
            return convert(name, hint, text)
        except UsageError as e:
            raise argparse.ArgumentTypeError(str(e)) from None

    converted.__name__ = name
    return converted


@functools.cache
def _hf_parser_class() -> type:
    # imported here: transformers takes seconds to import, and `--help` of a data command
    # should not wait for it longer than it must
    from transformers.hf_argparser import HfArgumentParser

    class Parser(_OneLineErrors, HfArgumentParser):
        """HfArgumentParser over dataclasses, with one-line errors and one spelling per flag."""

        def __init__(self, classes, sections: bool, **kwargs):
            self._sections = sections
            super().__init__(classes, allow_abbrev=False, formatter_class=HelpFormatter, **kwargs)

        def _group(self, section: type):
            title = (section.__doc__ or section.__name__).strip().split("\n")[0]
            groups = self.__dict__.setdefault("_section_groups", {})
            if title not in groups:
                groups[title] = self.add_argument_group(title)
            return groups[title]

        def _add_dataclass_arguments(self, dtype):
            hints = type_hints(dtype)
            for declared in fields(dtype):
                if not declared.init:
                    continue
                # a composed config's fields name their section: --help groups by it
                section = declared.metadata.get("section") or (dtype if self._sections else None)
                target = self._group(section) if section else self
                # HfArgumentParser narrows field.type in place; it gets a copy
                f = copy.copy(declared)
                f.type = hints[f.name]
                f.metadata = {"help": (declared.metadata.get("help") or "").replace("%", "%%")}
                if choices_of(f.type) is not None and typing.get_origin(f.type) is not Literal:
                    # `Literal[...] | None`: HfArgumentParser wants a plain Literal
                    f.type = next(m for m in _union_members(f.type) if m is not type(None))
                self._parse_dataclass_field(target, f)
                action = self._option_string_actions[f"--{f.name}"]
                element = _list_element(hints[f.name])
                if element is not None:  # --adapter A B, or --adapter A --adapter B
                    extend = argparse._ExtendAction(
                        action.option_strings,
                        action.dest,
                        nargs="+",
                        default=action.default,
                        help=action.help,
                    )
                    self._remove_action(action)
                    for group in self._action_groups:  # --help lists the groups' actions
                        if action in group._group_actions:
                            group._group_actions.remove(action)
                    for flag in action.option_strings:
                        self._option_string_actions.pop(flag, None)
                    target._add_action(extend)
                    action = extend
                    action.type = _field_converter(f.name, element)
                else:
                    action.type = _field_converter(f.name, hints[f.name])
                action.metavar = _metavar(hints[f.name])
                action.choices = None  # convert() checks choices with a one-line message
                if set(_union_members(hints[f.name])) - {type(None)} == {bool}:
                    action.nargs, action.const = "?", True  # `--flag` alone, as for a bool
                for alias in [o for o in action.option_strings if "-" in o[2:]]:
                    action.option_strings.remove(alias)
                    del self._option_string_actions[alias]
                complement = self._option_string_actions.get(f"--no_{f.name}")
                if complement is not None:  # HfArgumentParser's --no_flag for True defaults
                    complement.help = argparse.SUPPRESS

    return Parser


def build_parser(
    *classes: type, prog: str | None = None, description: str = "", usage: str | None = None
) -> argparse.ArgumentParser:
    """The parser of one or several dataclasses (several: --help groups them by section)."""
    return _hf_parser_class()(
        classes, len(classes) > 1, prog=prog, description=description, usage=usage
    )


def _positionals(classes) -> list[str]:
    return [f.name for c in classes for f in fields(c) if f.metadata.get("positional")]


def _with_positionals(argv: list[str], names: list[str]) -> list[str]:
    """Leading bare words fill the positional options, in order, unless given by flag."""
    given = {a[2:].partition("=")[0] for a in argv if a.startswith("--")}
    free = [n for n in names if n not in given]
    out, i = [], 0
    while i < len(argv) and free and not argv[i].startswith("-"):
        out += [f"--{free.pop(0)}", argv[i]]
        i += 1
    return out + argv[i:]


def parse(
    classes: type | tuple[type, ...],
    argv: list[str] | None = None,
    *,
    prog: str | None = None,
    description: str = "",
    defaults: dict | None = None,
    parser: argparse.ArgumentParser | None = None,
):
    """The dataclass instance(s) that `argv` describes. `--help` prints and exits 0; anything
    wrong raises one UsageError. `defaults` overrides the dataclasses' own defaults."""
    single = not isinstance(classes, tuple)
    classes = (classes,) if single else classes
    argv = normalize(list(sys.argv[1:] if argv is None else argv))
    argv = _with_positionals(argv, _positionals(classes))
    parser = parser or build_parser(*classes, prog=prog, description=description)
    if defaults:
        parser.set_defaults(**defaults)
    instances = _parse_into(parser, argv, classes)
    presets = _presets_given(instances)
    if presets:  # parsed again over the preset values: the flags given still win
        parser.set_defaults(**presets)
        instances = _parse_into(parser, argv, classes)
    for instance in instances:
        check_declared(instance)
    return instances[0] if single else tuple(instances)


def _parse_into(parser, argv: list[str], classes: tuple) -> list:
    *instances, extra = parser.parse_args_into_dataclasses(
        argv, return_remaining_strings=True, look_for_args_file=False
    )
    if extra:
        known = [f.name for c in classes for f in fields(c)]
        if extra[0].startswith("--"):
            raise unknown_option(extra[0][2:].partition("=")[0], known)
        raise UsageError(f"command line: unexpected argument {extra[0]!r}: options are --key value")
    return instances[: len(classes)]


def _presets_given(instances) -> dict:
    """The values the flags given with a `preset` set (see `option`)."""
    known = {f.name for instance in instances for f in fields(instance)}
    presets = {}
    for instance in instances:
        for f in fields(instance):
            preset = f.metadata.get("preset")
            if preset and getattr(instance, f.name) is True:
                unknown = set(preset) - known
                if unknown:
                    raise TypeError(f"--{f.name}: its preset names no option {sorted(unknown)}")
                presets.update(preset)
    return presets


def check_declared(options) -> None:
    """What each option declares about its value, checked before any work: `minimum=N` (a
    count of steps or rounds that cannot be zero or negative: a UsageError below it) and
    `check=function(value, flag)` (which raises an InputError: an output path that cannot be
    written, say, refused before the run rather than after it)."""
    for f in fields(options):
        low, value = f.metadata.get("minimum"), getattr(options, f.name)
        if low is not None and value is not None and value < low:
            raise UsageError(f"--{f.name} {value}: give {low} or more")
        check = f.metadata.get("check")
        if check is not None and value is not None:
            check(value, f"--{f.name}")


def asdict(obj) -> dict:
    return dataclasses.asdict(obj)


# --------------------------------------------------------------------------- the boundary


def entry_point(main):
    """Run `main(argv)` as a command: see the module docstring for what becomes what."""

    @functools.wraps(main)
    def run(argv: list[str] | None = None) -> int:
        try:
            code = main(argv)
        except RunStopped as e:
            print(f"stopped: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
            return e.exit_status
        except InputError as e:
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
            return e.exit_status
        except BrokenPipeError:
            # the reader (`| head`) has gone: no traceback, and no second error when Python
            # flushes stdout at exit
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 0
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr, flush=True)
            return 130
        return code or 0

    return run
