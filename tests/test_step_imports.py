"""The step package sits below the loops: ``fastloop.step`` never imports ``fastloop.loops`` at run
time (type-only imports under ``TYPE_CHECKING`` are fine), and every step module imports in a fresh
interpreter where the loops (and the trainer above them) cannot be imported at all."""
import ast
import pathlib
import subprocess
import sys

import fastloop
import fastloop.loops

STEP = pathlib.Path(fastloop.__file__).parent / "step"


def runtime_imports(path: pathlib.Path):
    """Modules ``path`` imports outside ``if TYPE_CHECKING:`` blocks (function-level imports too)."""
    tree = ast.parse(path.read_text())
    type_only = {id(n) for block in ast.walk(tree) if isinstance(block, ast.If)
                 and getattr(block.test, "id", getattr(block.test, "attr", None)) == "TYPE_CHECKING"
                 for stmt in block.body for n in ast.walk(stmt)}
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module


def test_no_step_module_imports_the_loops():
    found = {path.name: name for path in sorted(STEP.glob("*.py")) for name in runtime_imports(path)
             if name == "fastloop.loops" or name.startswith("fastloop.loops.")}
    assert found == {}


def test_step_modules_import_without_the_loops():
    script = f"""
import importlib, importlib.abc, pkgutil, sys, types
class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.startswith(("fastloop.loops", "fastloop.trainer")):
            raise ImportError(f"step imported {{name}}")
sys.meta_path.insert(0, Blocked())
package = types.ModuleType("fastloop")  # the package without its __init__ (which imports the trainer)
package.__path__ = [{str(STEP.parent)!r}]
sys.modules["fastloop"] = package
names = [m.name for m in pkgutil.iter_modules([{str(STEP)!r}])]
for name in names:
    importlib.import_module("fastloop.step." + name)
print(sorted(names))
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "'build'" in done.stdout and "'output'" in done.stdout


def test_step_output_is_still_importable_from_the_loops():
    from fastloop.step.output import StepOutput

    assert fastloop.loops.StepOutput is StepOutput
    from fastloop.loops.optimizer import StepOutput as again

    assert again is StepOutput
