"""The package's layering, checked from the source: no import circle between files or between
folders of ``irmlens/``, and ``sae_training`` imports only the irmlens modules its docstring names."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAE_TRAINING_MAY_IMPORT = {
    "irmlens.cache.store",
    "irmlens.io",
    "irmlens.errors",
    "irmlens.allocator",
    "irmlens.lock",
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_only(tree: ast.Module) -> set[int]:
    """The ids of the import nodes under ``if TYPE_CHECKING:`` (never executed, so they cannot
    make an import circle: a module may name the types it checks without importing them)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            out |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return out


def _imports(path: Path) -> set[str]:
    """Every module imported anywhere in the file (function-level imports included; type-only
    imports under ``if TYPE_CHECKING:`` left out)."""
    out = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_only(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names}
    return out


def _graph(package: str) -> dict[str, set[str]]:
    files = {_module_name(p): p for p in (ROOT / package).rglob("*.py")}
    return {m: {i for i in _imports(p) if i in files and i != m} for m, p in files.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state, stack = {}, []

    def visit(n):
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def _folder(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 else module


def test_no_import_circle_between_files():
    assert _cycle(_graph("irmlens")) is None, _cycle(_graph("irmlens"))


def test_no_import_circle_between_folders():
    graph = _graph("irmlens")
    folders: dict[str, set[str]] = {}
    for m, deps in graph.items():
        folders.setdefault(_folder(m), set()).update(
            _folder(d) for d in deps if _folder(d) != _folder(m)
        )
    # the package root (irmlens/__init__.py) only re-exports lazily: leave it out
    folders.pop("irmlens", None)
    folders = {k: v - {"irmlens"} for k, v in folders.items()}
    assert _cycle(folders) is None, _cycle(folders)


def test_sae_training_imports_only_what_its_docstring_names():
    used = set()
    for p in (ROOT / "sae_training").rglob("*.py"):
        used |= {i for i in _imports(p) if i.split(".")[0] == "irmlens"}
    # `from irmlens.io import atomic_dir` yields irmlens.io and irmlens.io.atomic_dir: keep modules
    modules = {u.rsplit(".", 1)[0] if u.rsplit(".", 1)[0] in used else u for u in used}
    assert modules <= SAE_TRAINING_MAY_IMPORT, modules - SAE_TRAINING_MAY_IMPORT
    doc = ast.get_docstring(ast.parse((ROOT / "sae_training" / "__init__.py").read_text()))
    for m in SAE_TRAINING_MAY_IMPORT:
        assert m in doc
