"""The package's layers, checked on its import graph.

Every import of one ``kd_platform`` module by another, at module level or inside a
function, is an edge. The graph must have no cycle, a package importing its own
submodules included (registries load their entries dynamically, from a leaf
``registry`` module, so no module needs its own package), and no edge may point from a
layer to one above it: data flows down, nothing flows up.
"""
from __future__ import annotations

import ast
from pathlib import Path

import kd_platform

ROOT = Path(kd_platform.__file__).parent

LAYERS: list[set[str]] = [
    {"errors", "registry", "console", "losses", "stats"},  # leaves anyone may use
    {"config"},      # knobs and the recipe
    {"models"},
    {"data"},
    {"methods"},
    {"run"},         # one run in-process: spec, engine, evaluation, checkpoints, flatness
    {"teachers"},    # the teacher stage and its store
    {"tracking"},    # MLflow
    {"launch"},      # where a run executes: in-process, Ray Train, a Tune trial
    {"sweep"},       # many runs: tuner, spaces, ablations, presets
    {"analysis"},
    {"cli", "cluster_config", "cluster_smoke", "compare"},
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(current: str, is_package: bool, level: int, target: str | None) -> str:
    base = current.split(".")
    base = base if is_package else base[:-1]
    if level > 1:
        base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def import_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node.level, node.module) if node.level else (node.module or "")
                # ``from pkg import sub`` depends on the submodule; ``from pkg import attr`` on pkg.
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
                targets = subs + ([base] if len(subs) < len(node.names) else [])
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state:
                found = visit(n)
                if found:
                    return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            found = visit(m)
            if found:
                return found
    return None


def layer_of(module: str) -> int | None:
    parts = module.split(".")
    if len(parts) < 2:
        return None  # the root package itself
    for i, layer in enumerate(LAYERS):
        if parts[1] in layer:
            return i
    raise AssertionError(f"{module} belongs to no layer: add it to LAYERS")


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for m, targets in sorted(graph.items()):
        for t in sorted(targets):
            lm, lt = layer_of(m), layer_of(t)
            if lm is not None and lt is not None and lt > lm:
                bad.append(f"{m} -> {t}")
    return bad


def test_the_walk_sees_real_edges():
    graph = import_graph()
    assert "kd_platform.run.engine" in graph["kd_platform.launch.trial"]
    assert "kd_platform.models.registry" in graph["kd_platform.models.resnet"]
    assert "kd_platform.models.wrn" in graph["kd_platform.models.multibranch"]  # ``from pkg import sub``
    assert "kd_platform.models" not in graph["kd_platform.models.multibranch"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"p": {"p.x"}, "p.x": {"p"}}) == ["p", "p.x", "p"]  # a registry loop counts
    assert upward_imports({"kd_platform.run.engine": {"kd_platform.sweep.tuner"}}) == [
        "kd_platform.run.engine -> kd_platform.sweep.tuner"]


def test_no_import_cycle_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_no_layer_imports_one_above_it():
    assert upward_imports(import_graph()) == []


def test_every_subpackage_says_what_it_may_import():
    for init in ROOT.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert "import" in doc.lower(), f"{init.parent.name}/__init__.py: the docstring names no import rule"


def test_few_modules_at_the_top():
    top = sorted(p.stem for p in ROOT.glob("*.py") if p.stem != "__init__")
    assert len(top) <= 8, top
