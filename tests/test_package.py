"""The package's shape: imports only go down (no cycle), and every stage says what it does."""

import ast
import inspect
import subprocess
import sys
from pathlib import Path

from cqil.stages import STAGES

PACKAGE = Path(__file__).resolve().parents[1] / "cqil"
MODULE_LINES, FUNCTION_LINES = 450, 60  # what a newcomer reads in one go


def imports() -> dict[str, set[str]]:
    """Module -> the package modules it imports (relative imports, also those inside functions)."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.with_suffix("").relative_to(PACKAGE.parent).parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
                deps |= {f"{base}.{alias.name}" for alias in node.names} if node.module is None else {base}
        found[name] = deps
    return {name: {dep for dep in deps if dep in found and dep != name} for name, deps in found.items()}


def test_the_import_graph_has_no_cycle():
    graph, done, path = imports(), set(), []

    def visit(name):
        assert name not in path, f"import cycle: {' -> '.join(path[path.index(name) :] + [name])}"
        if name in done:
            return
        path.append(name)
        for dep in sorted(graph[name]):
            visit(dep)
        done.add(path.pop())

    for name in sorted(graph):
        visit(name)
    assert graph["cqil.layers"] == {"cqil.errors"} and graph["cqil.plan"] == {"cqil.errors"}  # the bottom layers


def test_every_stage_has_a_run_function_that_says_what_it_does():
    for name, (settings, run) in STAGES.items():
        assert run.__name__.startswith("run_") and run.__doc__.startswith("The stage: "), name
        params = list(inspect.signature(run).parameters.values())
        assert (params[0].name == "settings") == (settings is not None), name
        assert all(p.kind is p.KEYWORD_ONLY for p in params if p.name not in ("settings", "inputs", "action")), name


def test_checking_a_config_and_reading_latency_results_start_without_torch():
    """`check_config` runs on every Snakemake parse, and the latency table reads JSON: importing either imports
    neither torch nor transformers."""
    code = "import cqil.config, cqil.latency.table, sys; assert not {'torch', 'transformers'} & set(sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_no_module_or_function_is_too_long_to_read():
    """Every module of cqil/ at most MODULE_LINES lines, every function (its def to its last line, docstring
    included) at most FUNCTION_LINES."""
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        text, name = path.read_text(), path.relative_to(PACKAGE.parent)
        if (lines := len(text.splitlines())) > MODULE_LINES:
            long.append(f"{name}: {lines} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                if (lines := node.end_lineno - node.lineno + 1) > FUNCTION_LINES:
                    long.append(f"{name}:{node.lineno}: {node.name}, {lines} lines")
    assert not long, "\n".join(long)
