"""The README's commands, as a newcomer would type them. Every command in a ```bash block is
checked: the make target, module or script it names exists, and every --option it passes is one
that entry point lists in its --help (a renamed or removed option fails here, not in a user's
terminal). The cheap ones (help, printed settings, the planner on a named model) are run as
written, in a fresh folder; the rest are listed with why they are not run here."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from help_probe import helps
from train_utils import REPO

README = REPO / "README.md"
# words in a README command that stand for the user's own files: such a command is checked
# (entry point, options) but cannot be run here
PLACEHOLDERS = ("/models/", "BASE", "SFT", "...", "train.json", "sharegpt_clean.json", "pairs.json")


def readme_commands() -> list[str]:
    """Each command of the README's bash blocks: continuation lines joined, comments dropped."""
    commands, block, pending = [], False, ""
    for line in README.read_text().splitlines():
        if line.strip().startswith("```"):
            block = line.strip() == "```bash"
            continue
        if not block:
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        text = shlex.join(shlex.split(pending, comments=True))
        pending = ""
        if text:
            commands.append(text)
    return commands


def entry_point(words: list[str]) -> tuple[str | None, list[str]]:
    """The module a command runs (as `python -m` names it) and the words passed to it."""
    if words[:2] == ["accelerate", "launch"]:
        words = words[2:]
        while words and words[0].startswith("--"):  # accelerate's own options and values
            words = words[2:] if len(words) > 1 and not words[1].startswith("-") else words[1:]
        words = ["python", *words]
    if words[0] != "python":
        return None, words
    if words[1] == "-m" and words[2] == "fastchat_data":  # the data tools: one per command
        return f"fastchat_data.cli {words[3]}", words[4:]
    if words[1] == "-m":
        return words[2], words[3:]
    return words[1].removesuffix(".py").replace("/", "."), words[2:]


def options(words: list[str]) -> list[str]:
    """--options in a command line; `[--x]` is an optional one, `a|b` alternatives."""
    found = []
    for w in words:
        w = w.strip("[]")
        if w.startswith("--") and len(w) > 2:
            found.append(w.split("=")[0])
    return found


def makefile_targets() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return set(re.findall(r"^([a-z][\w-]*):", text, re.M))


def makefile_variables() -> set[str]:
    text = (REPO / "Makefile").read_text()
    return set(re.findall(r"\$\((\w+)\)", text)) | set(re.findall(r"^(\w+)\s*\??=", text, re.M))


def cheap(command: str) -> bool:
    """Runs in seconds on this machine and reads nothing of the user's."""
    if any(p in command for p in PLACEHOLDERS) or ">" in command.replace("->", ""):
        return False
    return "--help" in command or command.startswith("python -m recipes.plan --model llama")


def test_readme_commands_name_what_exists_and_the_cheap_ones_run(tmp_path):
    commands = readme_commands()
    assert len(commands) >= 20, "the README's bash blocks were not found"
    modules = sorted({m for c in commands if (m := entry_point(shlex.split(c))[0])})
    env = {**os.environ, "PYTHONPATH": str(REPO), "HOME": str(tmp_path / "home")}
    help_texts = {name: text for name, (_, text) in helps(modules, cwd=tmp_path, env=env).items()}
    targets, variables = makefile_targets(), makefile_variables()
    problems, ran, not_run = [], [], []
    for command in commands:
        words = shlex.split(command)
        if words[0] == "make":
            for w in words[1:]:
                if "=" in w:
                    if w.split("=")[0] not in variables:
                        problems.append(f"{command}: the Makefile has no variable {w}")
                elif w not in targets:
                    problems.append(f"{command}: the Makefile has no target {w}")
            not_run.append((command, "a make target (demo/test: CI; the rest: GPUs or minutes)"))
            continue
        module, args = entry_point(words)
        if module is None:
            problems.append(f"{command}: not a python, accelerate or make command")
            continue
        if not help_texts.get(module):
            problems.append(f"{command}: {module} printed no --help")
            continue
        if "--" in args:  # launch.train passes what follows `--` to the recipe
            args = args[: args.index("--")]
        for option in options(args):
            if option not in help_texts[module]:
                problems.append(f"{command}: {module} has no option {option}")
        if cheap(command):
            argv = [sys.executable, "-m", *module.split(), *(a.strip("[]") for a in args)]
            out = subprocess.run(
                argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
            )
            if out.returncode != 0:
                problems.append(f"{command}: exit {out.returncode}: {out.stderr[-500:]}")
            ran.append(command)
        else:
            not_run.append((command, "names the user's own model, data or GPUs"))
    assert not problems, "\n".join(problems)
    assert ran, "no README command was cheap enough to run"
    print(f"\nran {len(ran)} README commands; checked {len(not_run)} others without running:")
    for command, why in not_run:
        print(f"  {why}: {command}")
    assert not list(tmp_path.glob("runs")), "a cheap README command wrote a run"


@pytest.mark.parametrize("make_target", ["demo", "test"])
def test_the_two_commands_are_what_the_readme_says(make_target):
    """`make demo` and `make test` come first, and CI runs exactly `make test`."""
    first = readme_commands()[:2]
    assert f"make {make_target}" in first
    assert "make test" in Path(REPO / ".ci" / "run").read_text()
