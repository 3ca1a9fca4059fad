"""The layout's rules, checked on the source tree: which package may import which, and module sizes.

- ``common`` is shared by every process: importing all of it pulls in no
  ``producer``, ``router`` or ``gpu_worker`` module, and no torch;
- the engine (``gpu_worker/engine``, ``layers``, ``models``, ``weights``,
  ``llm.py``) runs without the serving layer: none of it imports
  ``gpu_worker.serve``, not even inside a function;
- ``producer`` (the client side) never imports torch;
- no module of ``common``, ``producer``, ``router`` or ``gpu_worker`` is over
  450 lines.

The import rules are checked in a fresh interpreter each, so that what this
test process already imported cannot hide a violation.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("common", "producer", "router", "gpu_worker")
MAX_MODULE_LINES = 450
ENGINE_SOURCES = ("gpu_worker/engine", "gpu_worker/layers", "gpu_worker/models", "gpu_worker/weights",
                  "gpu_worker/llm.py")
SERVE = "gpu_worker.serve"

# Imports every module of a package (walking its subpackages), then prints the top-level
# names of the modules it ended up with: what importing that package costs a process.
_IMPORT_ALL = """
import importlib, json, pkgutil, sys
package = importlib.import_module(sys.argv[1])
failed = []
for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".", onerror=failed.append):
    importlib.import_module(info.name)
print(json.dumps({"modules": sorted({name.split(".")[0] for name in sys.modules}), "failed": failed}))
"""


def top_level_modules_after_importing_all_of(package: str) -> set[str]:
    """The top-level names in ``sys.modules`` of a fresh interpreter that imported every module of ``package``."""
    done = subprocess.run([sys.executable, "-c", _IMPORT_ALL, package], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert done.returncode == 0, f"importing every module of {package} failed:\n{done.stderr}"
    report = json.loads(done.stdout.splitlines()[-1])
    assert report["failed"] == [], f"subpackages of {package} that could not be walked: {report['failed']}"
    return set(report["modules"])


def python_files(*roots: str) -> list[Path]:
    """Every .py file under the given files or folders of the repository, in a stable order."""
    files: list[Path] = []
    for root in roots:
        path = REPO_ROOT / root
        assert path.exists(), f"{root} is gone: update the layout rules in this test"
        files += [path] if path.is_file() else sorted(path.rglob("*.py"))
    return files


def module_name(path: Path) -> str:
    """The dotted module name of a source file of the repository (a package's ``__init__`` is the package)."""
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_names(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` for every module a file may import: at top level, inside functions, or by name.

    A ``from X import a`` counts as importing ``X`` and ``X.a`` (``a`` may be a
    submodule); relative imports are resolved against the file's package;
    ``importlib.import_module("X")`` and ``__import__("X")`` with a literal
    name count too.
    """
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            found += [(node.lineno, module)] + [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")):
            found.append((node.lineno, node.args[0].value))
    return found


def test_common_imports_no_other_package_and_no_torch() -> None:
    leaked = top_level_modules_after_importing_all_of("common") & {"producer", "router", "gpu_worker", "torch"}
    assert leaked == set(), f"importing common pulls in {sorted(leaked)}: common is shared and torch-free"


def test_the_engine_never_imports_the_serving_layer() -> None:
    files = python_files(*ENGINE_SOURCES)
    assert len(files) > 10, f"found only {len(files)} engine modules; did the layout move?"
    offending = [f"{path.relative_to(REPO_ROOT)}:{line} imports {name}" for path in files
                 for line, name in imported_names(path) if name == SERVE or name.startswith(SERVE + ".")]
    assert offending == [], "the engine must run without gpu_worker.serve:\n" + "\n".join(offending)


def test_producer_never_imports_torch() -> None:
    modules = top_level_modules_after_importing_all_of("producer")
    assert "producer" in modules
    leaked = modules & {"torch"}
    assert leaked == set(), ("importing producer pulls in torch: the client side must stay torch-free "
                             "(start what needs torch as a subprocess)")


def test_no_module_is_over_450_lines() -> None:
    files = python_files(*PACKAGES)
    too_long = {str(path.relative_to(REPO_ROOT)): n for path in files
                if (n := len(path.read_text().splitlines())) > MAX_MODULE_LINES}
    assert too_long == {}, f"modules over {MAX_MODULE_LINES} lines (split them by job): {too_long}"


@pytest.mark.parametrize(("source", "expected"), [
    ("import gpu_worker.serve.jobs", "gpu_worker.serve.jobs"),
    ("from gpu_worker import serve", "gpu_worker.serve"),
    ("from ..serve import jobs", "gpu_worker.serve.jobs"),
    ("from .. import serve", "gpu_worker.serve"),
    ("def later():\n    from gpu_worker.serve.publisher import Publisher", "gpu_worker.serve.publisher"),
    ("import importlib\nimportlib.import_module('gpu_worker.serve.group')", "gpu_worker.serve.group"),
])
def test_imported_names_sees_every_form_of_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  source: str, expected: str) -> None:
    engine = tmp_path / "gpu_worker" / "engine"
    engine.mkdir(parents=True)
    (engine / "probe.py").write_text(source + "\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO_ROOT", tmp_path)
    assert expected in [name for _line, name in imported_names(engine / "probe.py")]
