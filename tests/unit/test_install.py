"""`pip install .` gives the client, the gateway and the CLI without torch; the worker needs `.[worker]`."""
from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WORKER_PACKAGES = ("torch", "transformers", "tokenizers", "safetensors", "gguf", "numpy", "jinja2")


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\[<>=!~; ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_the_base_install_leaves_the_workers_packages_to_the_worker_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    base, worker = _names(project["dependencies"]), _names(project["optional-dependencies"]["worker"])
    assert not base & set(WORKER_PACKAGES), f"in the base install: {sorted(base & set(WORKER_PACKAGES))}"
    assert set(WORKER_PACKAGES) <= worker


# Runs in a fresh interpreter where the worker's packages cannot be imported, as after a plain `pip install .`.
PROBE = f"""
import importlib, pkgutil, sys
for name in {WORKER_PACKAGES!r}:
    sys.modules[name] = None  # import raises ModuleNotFoundError, as when the package is not installed
for package in ("common", "producer", "router"):
    module = importlib.import_module(package)
    for info in pkgutil.walk_packages(module.__path__, package + "."):
        importlib.import_module(info.name)
from producer.gateway.app import create_app
from common.cli import main
print("help:", main(["--help"]) == 0)
print("worker:", main(["worker", "--group", "g0"]))
print("local:", main(["local", "hello"]))
"""


def test_client_gateway_and_cli_work_without_the_worker_packages_and_worker_commands_say_what_is_missing():
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "help: True" in proc.stdout
    assert "worker: 2" in proc.stdout and "local: 2" in proc.stdout
    assert proc.stderr.count("pip install 'tpqueue[worker]'") == 2, proc.stderr
