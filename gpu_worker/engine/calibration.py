"""Kernel choices measured on this machine at engine start, cached per CPU model, logged.

Decode attention over the gathered cache blocks runs either in the model
dtype (bf16/fp16) or upcast to float32; which is faster depends on the CPU
(its bf16 SDPA kernel took 2.6x float32's time on one AVX-512-BF16 machine)
and on the batch. At start, `attention_choice` times both on this rank's head
shape at decode batches 1 and 32 (context 256), picks the faster per batch,
and writes it to ``<cache>/calibration.json`` (the model store's cache root)
under a key of CPU model, CPU flags, torch version, threads, dtype and shape.
A later start with the same key reads the file instead. Ranks of one group
take turns on a lock, so one measures and the others read.

Float32 models and CUDA skip it; ``TPQ_CALIBRATE=0`` (or ``RunnerSpec.calibrate``
false) turns it off, and attention then stays in the model dtype.
``TPQ_CALIBRATE=refresh`` measures again and overwrites the cached entry: a
calibration taken while other work loaded the CPU (which only ever inflates
the times, but not both variants alike) is kept until then.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import time
from bisect import bisect_left
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from gpu_worker.kernels.host_cpu import cpu_flags_hash, cpu_model_name
from gpu_worker.layers.attention import DecodeScratch, decode_attention
from gpu_worker.weights.model_store import cache_root

log = logging.getLogger("tpqueue.calibration")

CALIBRATE_ENV = "TPQ_CALIBRATE"
CACHE_NAME = "calibration.json"
BATCHES = (1, 32)
CONTEXT = 256
METHOD = 2               # in the key: a change to what is measured invalidates older entries
CALLS = 20               # timed calls per variant and batch, alternating; each variant's time is its fastest


@dataclass(frozen=True)
class AttentionShape:
    """One rank's attention heads."""

    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class AttentionChoice:
    """Per measured decode batch size, whether decode attention runs upcast to float32."""

    upcast_by_batch: tuple[tuple[int, bool], ...]   # (batch, upcast), batches ascending

    def upcast(self, batch: int) -> bool:
        """The choice for a decode of ``batch`` sequences: that of the nearest measured batch (log scale)."""
        batches = [b for b, _ in self.upcast_by_batch]
        i = bisect_left(batches, batch)
        if i == len(batches) or (i > 0 and batch * batch < batches[i - 1] * batches[i]):
            i -= 1
        return self.upcast_by_batch[i][1]


def attention_choice(shape: AttentionShape, dtype: torch.dtype, device: torch.device, enabled: bool = True,
                     cache_dir: Path | None = None, cpu_name: str | None = None,
                     rank: int = 0) -> AttentionChoice | None:
    """The calibrated decode-attention choice for this CPU, measured once per key; None where none applies."""
    mode = os.environ.get(CALIBRATE_ENV, "1")
    if (not enabled or mode == "0" or device.type != "cpu"
            or dtype not in (torch.bfloat16, torch.float16)):
        return None
    key = cache_key(shape, dtype, cpu_name or cpu_model_name())
    path = cache_root(cache_dir) / CACHE_NAME
    try:
        with _locked(path):
            cases = _read(path).get(key)
            source = f"from {path}"
            if mode == "refresh" or not _valid(cases):
                cases = measure(shape, dtype)
                _write(path, key, cases)
                source = f"measured, saved to {path}"
    except OSError as exc:  # a read-only cache dir must not stop the engine
        log.warning("rank %d: calibration cache %s is not usable (%s); measuring without it", rank, path, exc)
        cases, source = measure(shape, dtype), "measured, not saved"
    log.info("rank %d: attention calibration (%s; %s): %s", rank, key, source, ", ".join(
        f"decode batch {c['batch']}: {str(dtype).removeprefix('torch.')} {c['model_dtype_us']:.0f} us, "
        f"float32 {c['float32_us']:.0f} us -> {'float32' if c['upcast'] else 'model dtype'}" for c in cases))
    return AttentionChoice(tuple((c["batch"], c["upcast"]) for c in cases))


def cache_key(shape: AttentionShape, dtype: torch.dtype, cpu_name: str) -> str:
    """What a measurement depends on: how it is taken, the CPU (name, flags), torch, threads, dtype, head shape."""
    return (f"method={METHOD}; cpu={cpu_name}; flags={cpu_flags_hash()}; torch={torch.__version__}"
            f"; threads={torch.get_num_threads()}"
            f"; {str(dtype).removeprefix('torch.')}; heads={shape.num_heads}/{shape.num_kv_heads}x{shape.head_dim}"
            f"; context={CONTEXT}")


def measure(shape: AttentionShape, dtype: torch.dtype) -> list[dict]:
    """Time decode attention in ``dtype`` and upcast to float32 at each of `BATCHES`; the faster wins per batch."""
    gen = torch.Generator().manual_seed(0)
    cases = []
    for batch in BATCHES:
        qk = torch.randn(batch, shape.num_heads + shape.num_kv_heads, shape.head_dim, generator=gen).to(dtype)
        q = qk[:, :shape.num_heads].unsqueeze(2)   # [b, heads, 1, dim], a view of q and k as in LlamaAttention
        keys, values = (torch.randn(batch, CONTEXT, shape.num_kv_heads, shape.head_dim, generator=gen)
                        .to(dtype) for _ in range(2))                                  # each [b, ctx, kv, dim]
        lengths = torch.randint(CONTEXT // 2, CONTEXT + 1, (batch, 1), generator=gen)       # [b, 1]
        mask = (torch.arange(CONTEXT) < lengths).view(batch, 1, 1, CONTEXT)                 # [b, 1, 1, ctx]
        scratch = DecodeScratch(torch.device("cpu"))   # as the runner does: no fresh float32 copies per call
        model_us, float_us = _time_pair(lambda up: decode_attention(q, keys, values, mask, up, scratch))
        cases.append({"batch": batch, "model_dtype_us": round(model_us, 1), "float32_us": round(float_us, 1),
                      "upcast": float_us < model_us})
    return cases


def _time_pair(run) -> tuple[float, float]:
    """Microseconds of one call of ``run(False)`` and of ``run(True)``: the fastest of `CALLS` alternating calls.

    The fastest, not the median: on a shared machine other work only ever
    adds time, and a call it hit says nothing about the kernel.
    """
    best = {False: float("inf"), True: float("inf")}
    with torch.inference_mode():
        for upcast in (False, True):
            run(upcast)                          # warm up: first calls pick kernels and allocate
        for _ in range(CALLS):
            for upcast in (False, True):
                start = time.perf_counter()
                run(upcast)
                best[upcast] = min(best[upcast], time.perf_counter() - start)
    return best[False] * 1e6, best[True] * 1e6


@contextmanager
def _locked(path: Path):
    """Hold an exclusive ``flock`` beside ``path`` (the ranks of a group start at once)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _read(path: Path) -> dict:
    """The cache file's entries; empty when it is missing or unreadable (then it is measured and rewritten)."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable calibration cache %s: %s", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def _valid(cases) -> bool:
    """Whether a cached entry has one well-formed case per batch of `BATCHES`."""
    fields = {"batch": int, "model_dtype_us": float, "float32_us": float, "upcast": bool}
    return (isinstance(cases, list) and [c.get("batch") for c in cases if isinstance(c, dict)] == list(BATCHES)
            and all(isinstance(c.get(k), t) for c in cases for k, t in fields.items()))


def _write(path: Path, key: str, cases: list[dict]) -> None:
    """Add one entry, atomically (a temporary file renamed over the old one)."""
    data = _read(path)
    data[key] = cases
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)
