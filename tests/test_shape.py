"""The code's shape, checked: no import cycles between camelid's modules (function-level
imports count), strategy and objective names compared only inside their registries, data
code never importing training code, every shipped YAML recipe loading and naming only
settings that differ from its recipe's defaults, and no `# fmt: skip` left."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("fastchat_data", "recipes", "launch")
SOURCES = sorted(p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """The camelid modules `path` imports, anywhere in it (a function's body included)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*up, base] if base else up)
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    known = {module_name(p) for p in SOURCES}
    return {m for m in found if m in known and m != name}


def test_no_import_cycles():
    graph = {module_name(p): imports(p) for p in SOURCES}
    # a package's __init__ importing its own modules is how a registry is filled, not a cycle
    for name in graph:
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".")}
    cycles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)


def test_data_code_never_imports_training_code():
    for path in (REPO / "fastchat_data").rglob("*.py"):
        bad = {m for m in imports(path) if m.startswith(("recipes", "launch"))}
        assert not bad, f"{path.name} imports {bad}"


STRATEGY_NAMES = (
    "single",
    "ddp",
    "fsdp",
    "fsdp_grad_op",
    "fsdp_offload",
    "zero2",
    "zero3",
    "zero3_offload",
)
# a strategy name compared, or tested as a prefix, in code: what the registry replaces
NAMES = "|".join(STRATEGY_NAMES)
COMPARED = re.compile(
    rf"""(==|!=|\bin\b|startswith\()\s*\(?\s*["']({NAMES})["']|["']({NAMES})["']\s*(==|!=)"""
)


@pytest.mark.parametrize("folder", ["recipes", "launch", "bench", "fastchat_data"])
def test_strategy_names_are_compared_only_in_the_registry(folder):
    found = []
    for path in (REPO / folder).rglob("*.py"):
        if path.name == "parallel.py":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if COMPARED.search(code):
                found.append(f"{path.relative_to(REPO)}:{i}: {line.strip()}")
    assert not found, "\n".join(found)


def test_objective_names_are_compared_only_in_the_registry():
    pattern = re.compile(r"""(==|!=)\s*["'](sft|dpo)["']|["'](sft|dpo)["']\s*(==|!=)""")
    found = [
        f"{p.relative_to(REPO)}:{i}"
        for p in [*(REPO / "recipes").rglob("*.py"), *(REPO / "launch").rglob("*.py")]
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if pattern.search(line.split("#")[0])
    ]
    assert not found, found


def test_no_fmt_skip_left():
    tree = [*SOURCES, *(REPO / "tests").glob("*.py"), *(REPO / "bench").glob("*.py")]
    marked = [
        f"{p.relative_to(REPO)}:{i}"
        for p in tree
        if p != Path(__file__)
        for i, line in enumerate(p.read_text().splitlines(), 1)
        if "fmt: skip" in line
    ]
    assert not marked, f"{len(marked)} `# fmt: skip` markers: {marked[:10]}"


def test_every_shipped_yaml_loads_and_names_only_non_defaults():
    from recipes.core.config import load_config
    from recipes.core.recipe import RECIPES

    by_yaml = {}
    for recipe in RECIPES.values():
        by_yaml[recipe.gpu_config] = recipe
        by_yaml[recipe.cpu_config] = recipe
    shipped = sorted((REPO / "recipes" / "configs").glob("*.yaml"))
    more_sft = {"vicuna_13b.yaml", "vicuna_7b_32k.yaml"}  # SFT recipes beside its defaults
    assert {p.name for p in shipped} <= set(by_yaml) | more_sft, "a YAML of no recipe"
    for path in shipped:
        recipe = by_yaml.get(path.name, RECIPES["sft"])
        cfg, _ = load_config(["--config", str(path)], recipe.config_class)
        defaults = recipe.config_class()
        values = yaml.safe_load(path.read_text())
        same = [k for k, v in values.items() if getattr(defaults, k) == getattr(cfg, k)]
        assert not same, f"{path.name} repeats defaults: {same}"
