"""The package layout: no import circles between mlx_lora's modules (counting imports inside
functions too: a lazy import that closes a circle is still a circle), and `import mlx_lora` loads
neither mlx nor torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "mlx_lora"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """mlx_lora modules a file imports (absolute or relative, at any depth of the file)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        found.update(c for c in candidates if c.startswith("mlx_lora") and c != name)
    return found


def test_no_import_circles():
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: {i for i in imports_of(path) if i in files} for name, path in files.items()}
    # a package's __init__ re-exporting its submodules is not a circle through them
    graph = {name: {i for i in deps if not (name.startswith(i + ".") and files[i].name == "__init__.py")}
             for name, deps in graph.items()}
    circles, state = [], {}

    def visit(node, stack):
        state[node] = "open"
        for dep in sorted(graph[node]):
            if state.get(dep) == "open":
                circles.append(stack[stack.index(dep):] + [dep])
            elif dep not in state:
                visit(dep, stack + [dep])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


def test_importing_the_package_loads_no_framework():
    code = "import sys, mlx_lora, mlx_lora.models, mlx_lora.adapters; print(sorted(m for m in ('mlx', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
