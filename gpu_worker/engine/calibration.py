"""Kernel choices measured on this machine at engine start, cached per CPU model, logged.

Decode attention runs one of three ways: the cache blocks gathered into a
padded copy and attended in the model dtype (bf16/fp16) or upcast to
float32, or the fused CPU kernel reading the blocks in place (when the
kernels load, `gpu_worker.kernels`). Which is fastest depends on the CPU
(torch's bf16 SDPA took 2.6x float32's time on one AVX-512-BF16 machine, and
beat the fused kernel from batch 8 on another) and on the batch. At start,
`attention_choice` times each on this rank's head shape at decode batches 1
and 32 (context 256, gather included), picks the fastest per batch, and
writes it to ``<cache>/calibration.json`` (the model store's cache root)
under a key of CPU model, CPU flags, torch version, threads, dtype, shape and
whether the kernels took part.
A later start with the same key reads the file instead. Ranks of one group
take turns on a lock, so one measures and the others read.

Float32 models and CUDA skip it; ``TPQ_CALIBRATE=0`` (or ``RunnerSpec.calibrate``
false) turns it off, and attention then runs the fused kernel where the
kernels load, else the model dtype.
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
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from gpu_worker.kernels.cpu_ops import CpuKernels
from gpu_worker.kernels.host_cpu import cpu_flags_hash, cpu_model_name
from gpu_worker.layers.attention import DecodeScratch, decode_attention, gather_blocks
from gpu_worker.weights.model_store import cache_root

log = logging.getLogger("tpqueue.calibration")

CALIBRATE_ENV = "TPQ_CALIBRATE"
CACHE_NAME = "calibration.json"
BATCHES = (1, 32)
CONTEXT = 256
METHOD = 3               # in the key: a change to what is measured invalidates older entries
CALLS = 20               # timed calls per variant and batch, alternating; each variant's time is its fastest


@dataclass(frozen=True)
class AttentionShape:
    """One rank's attention heads."""

    num_heads: int
    num_kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class AttentionChoice:
    """Per measured decode batch size, whether decode attention runs upcast to float32 or as the fused kernel."""

    upcast_by_batch: tuple[tuple[int, bool], ...]   # (batch, upcast), batches ascending
    fused_by_batch: tuple[tuple[int, bool], ...] = ()  # (batch, fused), the same batches; () when not measured

    def upcast(self, batch: int) -> bool:
        """The choice for a decode of ``batch`` sequences: that of the nearest measured batch (log scale)."""
        return self.upcast_by_batch[self._nearest(batch)][1]

    def fused(self, batch: int) -> bool:
        """Whether a decode of ``batch`` sequences runs the fused kernel (nearest measured batch, as `upcast`)."""
        return bool(self.fused_by_batch) and self.fused_by_batch[self._nearest(batch)][1]

    def _nearest(self, batch: int) -> int:
        batches = [b for b, _ in self.upcast_by_batch]
        i = bisect_left(batches, batch)
        if i == len(batches) or (i > 0 and batch * batch < batches[i - 1] * batches[i]):
            i -= 1
        return i


def attention_choice(shape: AttentionShape, dtype: torch.dtype, device: torch.device, enabled: bool = True,
                     cache_dir: Path | None = None, cpu_name: str | None = None,
                     rank: int = 0, kernels: CpuKernels | None = None) -> AttentionChoice | None:
    """The calibrated decode-attention choice for this CPU, measured once per key; None where none applies.

    With ``kernels`` (and a dtype they take), the fused kernel is one of the candidates.
    """
    mode = os.environ.get(CALIBRATE_ENV, "1")
    if (not enabled or mode == "0" or device.type != "cpu"
            or dtype not in (torch.bfloat16, torch.float16)):
        return None
    kernels = kernels if kernels is not None and kernels.supports(dtype) else None
    key = cache_key(shape, dtype, cpu_name or cpu_model_name(), kernels is not None)
    path = cache_root(cache_dir) / CACHE_NAME
    try:
        with _locked(path):
            cases = _read(path).get(key)
            source = f"from {path}"
            if mode == "refresh" or not _valid(cases):
                cases = measure(shape, dtype, kernels)
                _write(path, key, cases)
                source = f"measured, saved to {path}"
    except OSError as exc:  # a read-only cache dir must not stop the engine
        log.warning("rank %d: calibration cache %s is not usable (%s); measuring without it", rank, path, exc)
        cases, source = measure(shape, dtype, kernels), "measured, not saved"
    log.info("rank %d: attention calibration (%s; %s): %s", rank, key, source, ", ".join(
        f"decode batch {c['batch']}: {str(dtype).removeprefix('torch.')} {c['model_dtype_us']:.0f} us, "
        f"float32 {c['float32_us']:.0f} us, fused {c['fused_us'] if c['fused_us'] is not None else '-'} us -> "
        f"{'fused' if c['fused'] else 'float32' if c['upcast'] else 'model dtype'}" for c in cases))
    return AttentionChoice(tuple((c["batch"], c["upcast"]) for c in cases),
                           tuple((c["batch"], c["fused"]) for c in cases))


def cache_key(shape: AttentionShape, dtype: torch.dtype, cpu_name: str, fused: bool = False) -> str:
    """What a measurement depends on: how it is taken, the CPU (name, flags), torch, threads, dtype, head shape,
    and whether the fused kernel was a candidate."""
    return (f"method={METHOD}; cpu={cpu_name}; flags={cpu_flags_hash()}; torch={torch.__version__}"
            f"; threads={torch.get_num_threads()}"
            f"; {str(dtype).removeprefix('torch.')}; heads={shape.num_heads}/{shape.num_kv_heads}x{shape.head_dim}"
            f"; context={CONTEXT}; fused={int(fused)}")


def measure(shape: AttentionShape, dtype: torch.dtype, kernels: CpuKernels | None = None) -> list[dict]:
    """Time decode attention at each of `BATCHES`, the gather from a paged cache included: in ``dtype``, upcast
    to float32, and (with ``kernels``) the fused kernel; the fastest wins per batch."""
    gen = torch.Generator().manual_seed(0)
    block_size, blocks = 16, CONTEXT // 16
    cases = []
    for batch in BATCHES:
        qk = torch.randn(batch, shape.num_heads + shape.num_kv_heads, shape.head_dim, generator=gen).to(dtype)
        q = qk[:, :shape.num_heads]                # [b, heads, dim], a view of q and k as in LlamaAttention
        k_cache, v_cache = (torch.randn(batch * blocks, block_size, shape.num_kv_heads, shape.head_dim,
                                        generator=gen).to(dtype) for _ in range(2))  # [b * blocks, bs, kv, dim]
        tables = torch.randperm(batch * blocks, generator=gen).view(batch, blocks)          # [b, blocks]
        lengths = torch.randint(CONTEXT // 2, CONTEXT + 1, (batch,), generator=gen)         # [b]
        mask = (torch.arange(CONTEXT) < lengths[:, None]).view(batch, 1, 1, CONTEXT)        # [b, 1, 1, ctx]
        scratch = DecodeScratch(torch.device("cpu"))   # as the runner does: no fresh float32 copies per call

        def gathered(upcast: bool) -> torch.Tensor:
            keys = gather_blocks(k_cache, tables, scratch, 0, dtype)                        # [b, ctx, kv, dim]
            values = gather_blocks(v_cache, tables, scratch, 1, dtype)
            return decode_attention(q.unsqueeze(2), keys, values, mask, upcast, scratch)

        runs = {"model_dtype_us": lambda: gathered(False), "float32_us": lambda: gathered(True)}
        if kernels is not None:
            runs["fused_us"] = lambda: kernels.paged_decode_attention(q, k_cache, v_cache, tables, lengths)
        times = {name: round(us, 1) for name, us in _fastest(runs).items()}
        times.setdefault("fused_us", None)
        best = min((us, name) for name, us in times.items() if us is not None)[1]
        cases.append({"batch": batch, **times, "upcast": best == "float32_us", "fused": best == "fused_us"})
    return cases


def _fastest(runs: dict[str, Callable[[], object]]) -> dict[str, float]:
    """Microseconds of one call of each run: the fastest of `CALLS` calls, the runs alternating.

    The fastest, not the median: on a shared machine other work only ever
    adds time, and a call it hit says nothing about the kernel.
    """
    best = {name: float("inf") for name in runs}
    with torch.inference_mode():
        for run in runs.values():
            run()                                # warm up: first calls pick kernels and allocate
        for _ in range(CALLS):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                best[name] = min(best[name], time.perf_counter() - start)
    return {name: seconds * 1e6 for name, seconds in best.items()}


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
    fields = {"batch": int, "model_dtype_us": float, "float32_us": float, "upcast": bool, "fused": bool,
              "fused_us": (float, type(None))}
    return (isinstance(cases, list) and [c.get("batch") for c in cases if isinstance(c, dict)] == list(BATCHES)
            and all(k in c and isinstance(c[k], t) for c in cases for k, t in fields.items()))


def _write(path: Path, key: str, cases: list[dict]) -> None:
    """Add one entry, atomically (a temporary file renamed over the old one)."""
    data = _read(path)
    data[key] = cases
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)
