"""The file list is the architecture: no import circle in src/, config.py a leaf, and no module importing one that
stands above it (the commands on top, the trainer below them, the library below that)."""
from __future__ import annotations

import ast
import subprocess
import sys

from .conftest import ROOT

SRC = ROOT / "src"
COMMANDS = {"train", "compare", "evaluate", "sample", "reconstruct", "interpolate"}  # python -m src.<name>
TOOLS = {"evaluate", "sample", "reconstruct", "interpolate", "trained", "tool_args"}  # use a trained model
TRAINER = {"member", "loop", "engines", "state"}  # a run's members built, the one loop, its engines, its state
SHELL = {"lifecycle", "exits"}  # the process around training: a run's lifecycle, how a command ends


def imports() -> dict:
    """module -> the src modules it imports: every import statement, at any depth (function bodies, `if
    TYPE_CHECKING:` and `if __name__ == "__main__":` blocks too), relative or absolute. A module importing itself
    by its importable name (train.py's `__main__` block) is left out: that is not a circle between two files."""
    graph = {p.stem: set() for p in SRC.glob("*.py")}
    for name in graph:
        for node in ast.walk(ast.parse((SRC / f"{name}.py").read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                targets = [node.module.split(".")[0]] if node.module else [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("src."):
                targets = [node.module.split(".")[1]]
            elif isinstance(node, ast.ImportFrom) and node.module == "src":
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name.split(".")[1] for a in node.names if a.name.startswith("src.")]
            else:
                continue
            graph[name] |= {t for t in targets if t in graph and t != name}
    return graph


def main_blocks() -> set:
    """The modules that run as a program: those with an `if __name__ == "__main__":` block."""
    return {p.stem for p in SRC.glob("*.py")
            if any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in ast.parse(p.read_text()).body)}


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


def test_the_checker_finds_a_circle_and_every_kind_of_import(tmp_path):
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": set()}) is None
    graph = imports()  # the imports this checker must see: lazy, absolute, under __main__, TYPE_CHECKING
    assert {"checkpoint"} <= graph["identity"]  # a function body's `from .checkpoint import ...`
    assert {"member"} <= graph["engines"]  # under `if TYPE_CHECKING:`
    assert {"exits"} <= graph["train"]


def test_no_import_circle_in_src():
    assert cycle(imports()) is None, " -> ".join(cycle(imports()))


def test_config_is_a_leaf():
    assert imports()["config"] == set()


def test_the_commands_are_the_modules_that_run_as_programs():
    assert main_blocks() == COMMANDS
    for name in COMMANDS:  # each is named in the README as users type it
        assert f"python -m src.{name}" in (ROOT / "README.md").read_text(), name


def test_no_module_imports_one_above_it():
    graph = imports()
    for module, targets in graph.items():
        assert not COMMANDS & targets, f"{module} imports the command(s) {COMMANDS & targets}"
        if module not in TRAINER | {"train"}:
            assert not TRAINER & targets, f"{module} imports the trainer ({TRAINER & targets})"
        if module in TOOLS:
            assert not SHELL & targets, f"the tool {module} imports the process shell ({SHELL & targets})"


def test_reading_records_and_comparing_does_not_import_torch():
    """`python -m src.compare` reads YAML and JSON: it loads no torch (seconds of import) to do it."""
    code = "import sys, src.compare, src.comparison, src.report, src.config, src.identity, src.naming, src.rundir; " \
           "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
