"""The package's imports run one way: adapters and the engine at the bottom, methods above them,
evaluation above those, load/save/zoo, recipes, reports and the CLI on top; and no module is
part of an import cycle (counting the package ``__init__`` every import of a submodule runs)."""

from __future__ import annotations

import ast
from pathlib import Path

import llmdeploy

ROOT = Path(llmdeploy.__file__).resolve().parent

#: rank of each top-level part: a module may import only parts of lower or equal rank
RANK = {
    "errors": 0, "fetch": 0,
    "models": 1, "kernels": 1,
    "compress": 2, "data": 2, "kv": 2,
    "quant": 3, "prune": 3, "finetune": 3, "delta": 3, "distill": 3, "decode": 3,
    "eval": 4,
    "io": 5, "recipe": 5, "report": 5, "serve": 5, "deploy": 5,
    "cli": 6, "__init__": 7, "__main__": 7,
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Modules of llmdeploy that ``name`` imports at import time (top-level statements only,
    not imports inside functions, which run later)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in tree.body:
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [mod] + [f"{mod}.{a.name}" for a in node.names]
        for t in targets:
            if not t.startswith("llmdeploy"):
                continue
            while t and t not in modules:
                t = t.rpartition(".")[0]
            if t:
                found.add(t)
    # importing a.b.c runs a/__init__ and a/b/__init__ first
    for t in list(found):
        parts = t.split(".")
        found.update(".".join(parts[:i]) for i in range(2, len(parts)) if ".".join(parts[:i]) in modules)
    found.discard(name)
    return found


def _part(name: str) -> str:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_imports_flow_one_way():
    modules = _modules()
    bad = []
    for name, path in modules.items():
        for dep in _imports(name, path, modules):
            if dep == "llmdeploy" or _part(dep) == _part(name):
                continue
            if RANK[_part(dep)] > RANK[_part(name)]:
                bad.append(f"{name} imports {dep}")
    assert not bad, "imports against the layering:\n" + "\n".join(sorted(bad))


def test_no_import_cycle():
    modules = _modules()
    graph = {n: {d for d in _imports(n, p, modules) if d != "llmdeploy"} for n, p in modules.items()}
    # a package's __init__ importing its own submodules is how packages work, not a cycle
    for n in graph:
        graph[n] = {d for d in graph[n] if not (d.startswith(n + ".") and modules[n].name == "__init__.py")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


def test_every_part_has_a_rank():
    assert {_part(n) for n in _modules()} <= set(RANK)


def test_no_family_names_in_algorithms():
    """Architecture knowledge lives in the adapters: no model_type tests, parameter-name literals
    of one family, or 'norm' in name guesses in the methods."""
    needles = ['"norm" in', "model_type ==", "lm_head.weight", "down_proj|", "fc2|", '"down_proj"', '"fc2"']
    # adapters know families; sliced_modeling rebuilds a family's classes without llmdeploy
    allowed = {"models/adapters.py", "prune/sliced_modeling.py"}
    hits = []
    for path in ROOT.rglob("*.py"):
        rel = str(path.relative_to(ROOT))
        if rel in allowed:
            continue
        text = path.read_text()
        docs = set()  # lines of docstrings: prose may name a family's parts
        for node in ast.walk(ast.parse(text)):
            body = getattr(node, "body", None)
            if isinstance(body, list) and body and isinstance(body[0], ast.Expr) \
                    and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                docs.update(range(body[0].lineno, body[0].end_lineno + 1))
        for i, line in enumerate(text.splitlines(), 1):
            code = line.split("  # ")[0] if not line.lstrip().startswith("#") else ""
            if i not in docs and any(n in code for n in needles):
                hits.append(f"{rel}:{i}: {line.strip()}")
    assert not hits, "\n".join(hits)
