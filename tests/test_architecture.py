"""The package's layers stay as docs/architecture.md draws them: no import cycle, each layer imports only below it.

Imports are read from the source (``ast``), lazy ones inside functions included, so a cycle or a forbidden
import hidden in a function body fails here too, not only at the moment it runs.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

import peft_safe

PACKAGE_DIR = os.path.dirname(peft_safe.__file__)
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80  # a function's code, its docstring left out

# What each layer may import, by the first dotted parts of the imported name. The layers below the package
# root: core < measure < safe, tuners < callbacks < bench, plan (applications).
FORBIDDEN = {
    "peft_safe.core": ("peft", "transformers", "peft_safe.safe", "peft_safe.tuners", "peft_safe.measure",
                       "peft_safe.callbacks", "peft_safe.bench", "peft_safe.plan", "peft_safe.registry"),
    "peft_safe.safe": ("transformers", "peft_safe.callbacks", "peft_safe.bench",
                       "peft_safe.plan", "peft_safe.registry"),
    "peft_safe.tuners": ("transformers.trainer", "transformers.trainer_callback", "peft_safe.callbacks",
                         "peft_safe.measure", "peft_safe.bench", "peft_safe.plan", "peft_safe.registry"),
    "peft_safe.measure": ("peft", "transformers", "peft_safe.safe", "peft_safe.tuners", "peft_safe.callbacks",
                          "peft_safe.bench", "peft_safe.plan", "peft_safe.registry"),
    "peft_safe.batch": ("peft", "transformers", "peft_safe."),
    "peft_safe.reporting": ("torch", "peft", "transformers", "peft_safe."),
    "peft_safe._peft_types": ("transformers", "peft_safe."),
    "peft_safe.callbacks": ("peft_safe.bench", "peft_safe.plan"),
}

# Inside safe/: method < savings < persistence < the tuner's public modules (config, config_fields, model), which
# compose the three parts and are imported by none of them.
_TUNER_FACE = ("peft_safe.safe.config", "peft_safe.safe.config_fields", "peft_safe.safe.model")
FORBIDDEN |= {
    "peft_safe.safe.method": ("peft_safe.safe.savings", "peft_safe.safe.persistence", *_TUNER_FACE),
    "peft_safe.safe.savings": ("peft_safe.safe.persistence", *_TUNER_FACE),
    "peft_safe.safe.persistence": _TUNER_FACE,
}


def _module_names() -> Iterator[tuple[str, str]]:
    for root, _, files in os.walk(PACKAGE_DIR):
        for file in sorted(files):
            if file.endswith(".py"):
                path = os.path.join(root, file)
                relative = os.path.relpath(path, os.path.dirname(PACKAGE_DIR))[: -len(".py")]
                name = relative.replace(os.sep, ".").removesuffix(".__init__")
                yield name, path


MODULES = dict(_module_names())


def _source(path: str) -> str:
    with open(path, encoding="utf-8") as file:
        return file.read()


def _imports(name: str, path: str) -> set[str]:
    """Every module ``name`` imports, anywhere in its source, as absolute dotted names."""
    tree = ast.parse(_source(path), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module
            found.add(prefix)
            for alias in node.names:  # ``from . import cka`` imports the submodule peft_safe.core.cka
                if f"{prefix}.{alias.name}" in MODULES:
                    found.add(f"{prefix}.{alias.name}")
    return found


GRAPH = {name: {m for m in _imports(name, path) if m in MODULES} for name, path in MODULES.items()}


def test_the_walk_sees_the_package_and_its_imports():
    # guards the test itself: a walk that found nothing would pass everything below
    assert {"peft_safe.safe.model", "peft_safe.core.cka", "peft_safe.callbacks.safe"} <= set(MODULES)
    assert "peft_safe.safe.method.scoring" in GRAPH["peft_safe.safe.model"]
    assert "peft_safe.core.cka" in GRAPH["peft_safe.safe.method.scoring"]


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycle_inside_the_package_lazy_imports_included():
    assert _find_cycle(GRAPH) is None, " -> ".join(_find_cycle(GRAPH))


def test_the_cycle_finder_finds_a_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_each_layer_imports_only_what_lies_below_it(layer):
    offending = []
    for name, path in MODULES.items():
        if name != layer and not name.startswith(layer + "."):
            continue
        for imported in _imports(name, path):
            for forbidden in FORBIDDEN[layer]:
                if imported == forbidden.rstrip(".") or imported.startswith(forbidden.rstrip(".") + "."):
                    offending.append(f"{name} imports {imported}")
    assert not offending, offending


def test_no_module_is_longer_than_a_few_hundred_lines():
    long = {name: n for name, path in MODULES.items() if (n := _source(path).count("\n")) > MAX_MODULE_LINES}
    assert not long, long


def _private_imports(name: str, path: str) -> list[str]:
    """``from <a peft_safe module> import _name`` in ``name``: a private name of one of our modules used in another."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(_source(path), path)):
        if not isinstance(node, ast.ImportFrom):
            continue
        base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
        source = ".".join(base + [node.module] if node.module else base) if node.level else node.module or ""
        if source == "peft_safe" or source.startswith("peft_safe."):
            found += [f"{name} imports {source}.{a.name}" for a in node.names
                      if a.name.startswith("_") and not a.name.startswith("__")]
    return found


def test_no_private_name_is_imported_from_another_module_of_the_package():
    offending = [line for name, path in MODULES.items() for line in _private_imports(name, path)]
    assert not offending, offending


def test_the_private_import_check_sees_relative_and_absolute_imports(tmp_path):
    module = tmp_path / "budget.py"
    module.write_text("from .truncation import _hidden, public\nfrom peft_safe.core.cka import _check\n"
                      "from peft.tuners import _private\n")
    assert _private_imports("peft_safe.safe.savings.budget", str(module)) == [
        "peft_safe.safe.savings.budget imports peft_safe.safe.savings.truncation._hidden",
        "peft_safe.safe.savings.budget imports peft_safe.core.cka._check"]


# The tuner's own modules (the class and its mixin); every other module sees it through safe/method/tuner_view.py.
TUNER_MODULES = ("peft_safe.safe.model", "peft_safe.safe.method.freezing")


def test_no_part_of_the_tuner_reads_a_private_member_of_it():
    import re

    offending = [f"{name}: {m.group(0)}" for name, path in MODULES.items() if name not in TUNER_MODULES
                 for m in re.finditer(r"\bsafe(?:_model)?\._[a-z]\w*", _source(path))]
    assert not offending, offending


def _function_lengths(path: str) -> Iterator[tuple[str, int]]:
    for node in ast.walk(ast.parse(_source(path), path)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            documented = isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant)
            start = (body[1].lineno if len(body) > 1 else body[0].end_lineno + 1) if documented else body[0].lineno
            yield node.name, node.end_lineno - start + 1


def test_no_function_is_longer_than_a_screen():
    long = {f"{name}.{function}": n for name, path in MODULES.items()
            for function, n in _function_lengths(path) if n > MAX_FUNCTION_LINES}
    assert not long, long


def test_safe_holds_only_its_public_modules_and_three_parts():
    safe_dir = os.path.join(PACKAGE_DIR, "safe")
    entries = [e for e in os.listdir(safe_dir) if e != "__pycache__"]
    assert sorted(e for e in entries if e.endswith(".py")) == ["__init__.py", "config.py", "config_fields.py",
                                                               "model.py"]
    assert sorted(e for e in entries if not e.endswith(".py")) == ["method", "persistence", "savings"]


def test_modules_moved_out_of_the_flat_safe_folder_resolve_by_their_old_names():
    # imports and pickles (a class recorded by module and name) written before the split keep working
    import importlib
    import pickle

    import peft_safe.safe

    for old, part in peft_safe.safe.MOVED_MODULES.items():
        moved = importlib.import_module(f"peft_safe.safe.{part}.{old}")
        assert importlib.import_module(f"peft_safe.safe.{old}") is moved
        assert getattr(peft_safe.safe, old) is moved
    cut = pickle.loads(b"cpeft_safe.safe.truncation\nBackpropCut\n.")
    assert cut is peft_safe.safe.savings.truncation.BackpropCut
    parts = ("method", "savings", "persistence")
    moved_files = {name.split(".")[3] for name in MODULES if name.split(".")[:3] in
                   [["peft_safe", "safe", part] for part in parts] and name.count(".") == 3}
    assert set(peft_safe.safe.MOVED_MODULES) == moved_files - {"history"}  # history.py is new in persistence


def test_every_module_says_what_it_owns():
    missing = [name for name, path in MODULES.items() if ast.get_docstring(ast.parse(_source(path))) is None]
    assert not missing, missing


def test_import_peft_safe_loads_no_trainer_and_leaves_torchs_flop_registry_alone():
    code = (
        "import sys\n"
        "from torch.utils import flop_counter\n"
        "before = set(flop_counter.flop_registry)\n"
        "import peft_safe\n"
        "assert set(flop_counter.flop_registry) == before, 'FLOP registry changed'\n"
        "heavy = sorted(m for m in sys.modules if m.startswith(('transformers.trainer', 'peft_safe.callbacks', "
        "'peft_safe.measure', 'peft_safe.bench', 'peft_safe.plan')))\n"
        "assert not heavy, heavy\n"
        "peft_safe.SAFECallback\n"  # the lazy names still resolve
        "assert 'transformers.trainer_callback' in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
