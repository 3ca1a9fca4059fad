"""Compiles the fused CPU kernels (``cpu_*.c``) once per machine and loads them with ctypes.

The library is built with the system C compiler (``$CC``, else ``cc`` or
``gcc``) for this CPU (``-march=native``) into the model store's cache root,
``<cache>/kernels/cpu_ops-<key>.so``, where the key covers the sources, the
flags, the compiler and the CPU: a later start, or another rank, loads the
file instead of compiling (about a second). Ranks that start at once may
both compile; each writes its own file and renames it into place.

``TPQ_CPU_KERNELS=0`` turns the kernels off (the step then runs torch ops
only), and so does a machine with no C compiler or a failed build: that is
logged once as a warning, and everything still works, only slower.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from gpu_worker.kernels.host_cpu import cpu_flags_hash, cpu_model_name
from gpu_worker.weights.model_store import cache_root

log = logging.getLogger("tpqueue.kernels")

ENV = "TPQ_CPU_KERNELS"
HERE = Path(__file__).parent
SOURCES = (HERE / "cpu_ops.c", HERE / "cpu_gemv.c", HERE / "cpu_decode.c")
HEADERS = (HERE / "cpu_common.h",)
FLAGS = ("-O3", "-fopenmp", "-fno-math-errno", "-fPIC", "-shared")
ARCHES = ("native", "haswell", "x86-64")
"""-march values: this CPU (what runs), and AVX2 and plain x86-64 (the tests build those too: each has its own
vector code in cpu_common.h)."""

_i64, _f32, _int, _ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p
SIGNATURES = {  # C function -> argument types (every one returns void)
    "tpq_rms_norm": (_int, _ptr, _i64, _ptr, _ptr, _ptr, _i64, _i64, _f32, _int),
    "tpq_silu_mul": (_int, _ptr, _ptr, _i64, _i64, _int),
    "tpq_rope": (_int, _ptr, _i64, _ptr, _ptr, _i64, _i64, _i64, _int),
    "tpq_paged_decode_attention": (_int, _int, _ptr, _i64, _ptr, _ptr, _ptr, _ptr, _i64, _ptr, _i64, _i64, _i64,
                                   _i64, _i64, _f32, _int),
    "tpq_dense_gemv": (_int, _ptr, _i64, _i64, _ptr, _ptr, _i64, _int),
    "tpq_int8_gemv": (_int, _ptr, _i64, _i64, _ptr, _ptr, _ptr, _i64, _int),
    "tpq_q4_gemv": (_int, _ptr, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _i64, _int),
    "tpq_q4_dequantize": (_int, _ptr, _ptr, _ptr, _i64, _i64, _i64, _ptr, _int),
    "tpq_decode_layers": (_int, _int, _ptr, _ptr, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _i64, _ptr, _i64,
                          _int, _int),
}


class BuildError(RuntimeError):
    """The kernels could not be compiled here."""


def compiler() -> str | None:
    """The C compiler to build with: ``$CC``, else ``cc`` or ``gcc`` on the PATH."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def library_path(cc: str, cache_dir: Path | None = None, arch: str = "native") -> Path:
    """Where the library built by ``cc`` for ``arch`` on this CPU from these sources lives."""
    texts = [path.read_text() for path in (*SOURCES, *HEADERS)]
    key = hashlib.sha256("\n".join([*texts, " ".join(FLAGS), arch, _compiler_version(cc), cpu_model_name(),
                                    cpu_flags_hash()]).encode()).hexdigest()[:16]
    return cache_root(cache_dir) / "kernels" / f"cpu_ops-{key}.so"


def build(cc: str, target: Path, arch: str = "native") -> float:
    """Compile the sources for ``-march=arch`` into ``target`` (atomically); returns the seconds it took."""
    target.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial = Path(tmp) / target.name
        done = subprocess.run([cc, *FLAGS, f"-march={arch}", "-o", str(partial), *map(str, SOURCES), "-lm"],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise BuildError(f"{cc} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        os.replace(partial, target)
    return time.perf_counter() - start


@functools.cache
def load() -> ctypes.CDLL | None:
    """The kernels library, built first if need be; None when turned off or not buildable here (logged)."""
    if os.environ.get(ENV, "1") == "0":
        log.info("fused CPU kernels off (%s=0): decode steps run torch ops only", ENV)
        return None
    cc = compiler()
    if cc is None:
        log.warning("no C compiler (set CC, or install gcc): fused CPU kernels off, decode steps are slower")
        return None
    try:
        return load_arch(cc, "native")
    except (OSError, BuildError, subprocess.SubprocessError) as exc:
        log.warning("fused CPU kernels off, decode steps are slower: %s", exc)
        return None


def load_arch(cc: str, arch: str, cache_dir: Path | None = None) -> ctypes.CDLL:
    """The library for ``-march=arch``, built first if need be (raises what the build or the load raised)."""
    path = library_path(cc, cache_dir, arch)
    if not path.exists():
        log.info("fused CPU kernels (-march=%s) built in %.1f s: %s", arch, build(cc, path, arch), path)
    library = ctypes.CDLL(str(path))
    for name, argtypes in SIGNATURES.items():
        function = getattr(library, name)
        function.argtypes, function.restype = argtypes, None
    return library


def platform_machine() -> str:
    """The machine's architecture as ``uname -m`` says it (x86_64, aarch64, ...)."""
    return platform.machine()


def _compiler_version(cc: str) -> str:
    try:
        return subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""
