"""The file list is the architecture: no import circle in src/, config.py a leaf, and no module importing one that
stands above it (the commands on top, the trainer below them, the library below that)."""
from __future__ import annotations

import ast
import subprocess
import sys

from .conftest import ROOT

SRC = ROOT / "src"
COMMANDS = {"cli", "compare", "evaluate", "sample", "reconstruct", "interpolate"}  # python -m src.<name>
TOOLS = {"evaluate", "sample", "reconstruct", "interpolate", "trained", "tool_args"}  # use a trained model
TRAINER = {"train", "packed", "lifecycle", "cli"}  # training (one run, or a pack of them) and the process around it


def _importing_nodes(tree: ast.Module):
    """Every node of a module but its `if __name__ == "__main__":` block, which runs only as a program (that is
    how `python -m src.train` reaches src/cli.py) and never when the module is imported."""
    tree.body = [n for n in tree.body if not (isinstance(n, ast.If) and "__main__" in ast.unparse(n.test))]
    yield from ast.walk(tree)


def imports() -> dict:
    """module -> the src modules it imports (relative imports, at any depth, lazy ones included)."""
    graph = {p.stem: set() for p in SRC.glob("*.py")}
    for name in graph:
        for node in _importing_nodes(ast.parse((SRC / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
                graph[name].add(node.module.split(".")[0])
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("src."):
                graph[name].add(node.module.split(".")[1])
    return graph


def cycle(graph: dict):
    """One import circle as a list of modules, or None."""
    state, stack = {}, []

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == "open":
                return stack[stack.index(v):] + [v]
            if v not in state and (found := visit(v)):
                return found
        state[u] = "done"
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_checker_finds_a_circle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle_in_src():
    assert cycle(imports()) is None, " -> ".join(cycle(imports()))


def test_config_is_a_leaf():
    assert imports()["config"] == set()


def test_no_module_imports_one_above_it():
    graph = imports()
    for module, targets in graph.items():
        above = COMMANDS & targets
        assert not above - ({"train"} if module == "cli" else set()), f"{module} imports the command(s) {above}"
        if module not in TRAINER:
            assert not TRAINER & targets, f"{module} imports the trainer ({TRAINER & targets})"
        if module in TOOLS:
            assert not {"train", "lifecycle", "cli"} & targets, f"the tool {module} imports the trainer"


def test_reading_records_and_comparing_does_not_import_torch():
    """`python -m src.compare` reads YAML and JSON: it loads no torch (seconds of import) to do it."""
    code = "import sys, src.compare, src.comparison, src.report, src.config, src.identity, src.naming, src.rundir; " \
           "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
