"""The house's rules (issue #17), read from the package's source with ``ast``, so a change that breaks one
fails here rather than in review:

- no import cycle among the package's modules, and no import that runs back up: the ground floor
  (``errors``, ``layout``, ``config``), then what builds on it (``store``, ``model``, ``data``,
  ``training``, ``metrics``), never imports the floors above (the run's lifecycle, the library, the steps,
  the DAG, the CLI); steps never import each other; nothing imports ``puzzle.cli`` or ``puzzle.commands``;
- store keys are spelled in at most two modules (``layout`` and the store's own bookkeeping);
- ``.backward()`` is called in one module, the training loop.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "jobs" / "puzzle"

#: Floors, ground first. A module may import its own floor and the floors below it, never one above.
FLOORS = [
    ("errors", "layout", "serving", "config", "distributed"),
    ("store", "model", "data", "generation", "training", "metrics", "export"),
    ("run", "library", "planning", "profiling", "icl", "distill", "evaluation", "launch",
     "report", "solver", "tiny_parent"),
    ("context", "steps"),
    ("pipeline", "argo", "local", "k8s", "cluster"),
    ("commands", "cli"),
]
# the DAG is pure data that the context reads to publish a step's declared outputs
ALLOWED_UP = {("context", "pipeline")}


def modules() -> dict[str, ast.Module]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"]
        out[".".join(["puzzle", *parts])] = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return out


def imports(name: str, tree: ast.Module) -> set[str]:
    """Project modules ``name`` imports (at any depth of the file: lazy imports count too)."""
    found = set()
    pkg = name.rsplit(".", 1)[0] if not name.endswith("__init__") else name
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("puzzle")}
        elif isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                mod = ".".join([*base, mod]) if mod else ".".join(base)
            if mod.startswith("puzzle"):
                found.add(mod)
                for a in node.names:  # `from puzzle import layout` imports the module puzzle.layout
                    if f"{mod}.{a.name}" in MODS:
                        found.add(f"{mod}.{a.name}")
    return found


MODS = modules()


def floor_of(module: str) -> tuple[int, str]:
    top = module.split(".")[1] if module.count(".") >= 1 else module
    for i, names in enumerate(FLOORS):
        if top in names:
            return i, top
    raise AssertionError(f"module {module} has no floor in tests/test_architecture.py FLOORS: place it")


def test_every_module_has_a_floor():
    for m in MODS:
        if m != "puzzle":
            floor_of(m)


def test_no_import_runs_back_up():
    bad = []
    for m, tree in MODS.items():
        if m == "puzzle":
            continue
        fm, top = floor_of(m)
        for dep in imports(m, tree):
            if dep == "puzzle" or dep not in MODS:
                continue
            fd, dtop = floor_of(dep)
            if fd > fm and (top, dtop) not in ALLOWED_UP:
                bad.append(f"{m} (floor {fm}) imports {dep} (floor {fd})")
    assert not bad, "imports that run back up:\n" + "\n".join(sorted(bad))


def test_steps_never_import_each_other_and_nothing_imports_the_cli():
    bad = []
    for m, tree in MODS.items():
        for dep in imports(m, tree):
            if m.startswith("puzzle.steps.") and dep.startswith("puzzle.steps.") and dep != m:
                bad.append(f"{m} imports {dep}")
            if dep in ("puzzle.cli",) or (dep.startswith("puzzle.commands") and not (
                    m.startswith("puzzle.commands") or m == "puzzle.cli")):
                bad.append(f"{m} imports {dep}")
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    graph = {m: {d for d in imports(m, t) if d in MODS and d != m and d != "puzzle"} for m, t in MODS.items()}
    # a package's __init__ re-exporting its own submodules is not a cycle of the house
    for m, deps in graph.items():
        graph[m] = {d for d in deps if not (d.startswith(m + ".") or m.startswith(d + "."))}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


KEY = re.compile(r"(^|[^A-Za-z_])(plan|done|failed|child|eval|scores|profile|profiles|solve|checkpoints|history|"
                 r"metrics|library|data)/|(config\.yaml|library\.json|status\.json|complete\.json|"
                 r"manifest\.json|meta\.json|key\.json)$")


def _docstring_nodes(tree: ast.Module) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = getattr(node, "body", [])
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def key_literals(tree: ast.Module) -> list[str]:
    docs = _docstring_nodes(tree)
    out = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs
                and KEY.search(node.value) and " " not in node.value.strip()):
            out.append(node.value)
    return out


def test_store_keys_are_spelled_in_at_most_two_modules():
    spelled = {m: key_literals(t) for m, t in MODS.items()}
    spelled = {m: v for m, v in spelled.items() if v}
    assert len(spelled) <= 2, f"store key literals outside puzzle.layout: { {m: v for m, v in spelled.items()} }"
    assert "puzzle.layout" in spelled


def test_backward_is_called_in_one_training_module():
    calls = sorted(m for m, t in MODS.items() for n in ast.walk(t)
                   if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "backward")
    assert calls == ["puzzle.training"], calls
