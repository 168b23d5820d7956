"""The package's shape, enforced: no import cycles, the library never imports an application, optional
dependencies only inside their own backend module, and every module says its one job in a docstring.

The import graph is read from the source (``ast``), function-level imports included (they are still
dependencies), imports under ``if TYPE_CHECKING:`` excluded (they never run). docs/design.md draws the
same map.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "rosa_peft"

# The applications: commands, harnesses and their support. Everything else is the library (what
# ``import rosa_peft`` and its public names need).
APPLICATIONS = ("train", "tasks", "eval", "bench", "study", "demo", "cli", "options", "configs", "convert_reference")

# Optional dependency -> the only modules allowed to import it (its backend module).
OPTIONAL = {
    "triton": {"sparse.triton_ops"},
    "torchao": {"bases.torchao_nf4"},
    "bitsandbytes": {"bases.bnb_4bit"},
    "matplotlib": {"utils.plots"},
    "peft": {"bench.peft_baselines"},
    "lm_eval": {"eval.lm_eval_helper"},
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.AST):
    """Every Import / ImportFrom, skipping ``if TYPE_CHECKING:`` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        stack.extend(ast.iter_child_nodes(node))


def _imports(module: str, path: Path) -> tuple[set[str], set[str]]:
    """(internal modules imported, top-level external packages imported) by one module."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    internal, external = set(), set()
    for node in _import_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            if node.level:
                base = package[: len(package) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            subs = [f"{origin}.{a.name}" for a in node.names if f"{origin}.{a.name}" in MODULES]
            names = subs or [origin]
        for name in names:
            if name.split(".")[0] == PACKAGE:
                # the deepest module the name refers to (``a.b.c`` may be attribute c of module a.b)
                while name and name not in MODULES:
                    name = name.rpartition(".")[0]
                if name and name != module:
                    internal.add(name)
            else:
                external.add(name.split(".")[0])
    return internal, external


GRAPH = {m: _imports(m, p) for m, p in MODULES.items()}


def _short(module: str) -> str:
    return module[len(PACKAGE) + 1:] if module != PACKAGE else ""


def _is_application(module: str) -> bool:
    return _short(module).split(".")[0] in APPLICATIONS


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), plus self-loops."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(GRAPH[v][0]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return out


def _package_edge(a: str, b: str) -> bool:
    """A package's ``__init__`` importing its own submodules (re-exports), or a submodule importing its
    package's ``__init__``: the normal shape of a package, not a design cycle."""
    return b.startswith(a + ".") or a.startswith(b + ".")


def test_the_map_is_read():
    assert len(MODULES) > 40
    assert f"{PACKAGE}.layer" in MODULES and f"{PACKAGE}.model" in MODULES
    assert f"{PACKAGE}.layer" in GRAPH[f"{PACKAGE}.model"][0]


def test_no_import_cycles():
    bad = []
    for comp in _cycles():
        members = set(comp)
        # keep only edges that are not package <-> own-submodule edges, and look for a cycle again
        edges = {m: {d for d in GRAPH[m][0] if d in members and not _package_edge(m, d)} for m in comp}
        if _has_cycle(edges):
            bad.append(comp)
    assert not bad, "import cycles (function-level imports count too): " + "; ".join(" <-> ".join(c) for c in bad)


def _has_cycle(edges: dict[str, set[str]]) -> bool:
    state = {}

    def dfs(v) -> bool:
        state[v] = 1
        for w in edges[v]:
            if state.get(w) == 1 or (w not in state and dfs(w)):
                return True
        state[v] = 2
        return False

    return any(v not in state and dfs(v) for v in edges)


def test_the_library_never_imports_an_application():
    bad = [f"{m} imports {d}" for m, (internal, _) in GRAPH.items() if not _is_application(m) and m != PACKAGE
           for d in sorted(internal) if _is_application(d)]
    assert not bad, "library -> application imports:\n" + "\n".join(bad)


@pytest.mark.parametrize("dependency", sorted(OPTIONAL))
def test_optional_dependency_only_in_its_backend_module(dependency):
    allowed = {f"{PACKAGE}.{m}" for m in OPTIONAL[dependency]}
    users = sorted(m for m, (_, external) in GRAPH.items() if dependency in external)
    assert set(users) <= allowed, f"{dependency} imported outside {sorted(allowed)}: {sorted(set(users) - allowed)}"
    for module in allowed:
        assert module in MODULES, f"{module} (the backend module of {dependency}) does not exist"


def test_every_module_says_its_job():
    missing = []
    for module, path in MODULES.items():
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        if not doc or not doc.strip().splitlines()[0].strip():
            missing.append(module)
    assert not missing, "modules without a docstring: " + ", ".join(missing)


def test_importing_the_library_loads_no_application_and_no_optional_backend():
    code = (
        "import sys, rosa_peft\n"
        "from rosa_peft import RosaConfig, RosaModel, get_rosa_model, compute_masks, RosaLinear, RosaEmbedding\n"
        "import rosa_peft.bases, rosa_peft.sparse, rosa_peft.masks\n"
        f"apps = {APPLICATIONS!r}\n"
        "bad = sorted(m for m in sys.modules if m.startswith('rosa_peft.') and m.split('.')[1] in apps)\n"
        "bad += sorted(m for m in ('matplotlib', 'peft', 'lm_eval', 'bitsandbytes', 'torchao') if m in sys.modules)\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "ROSA_PEFT_NO_TRITON": "1"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"loaded by the library: {out.stdout.strip()}"
