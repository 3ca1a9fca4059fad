"""One rank's model, KV cache and forward pass, driven by step plans."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gpu_worker.engine.calibration import AttentionChoice, AttentionShape, attention_choice
from gpu_worker.engine.compiled_decode import BATCH_SIZES, CompiledDecode, pad_decode_payload
from gpu_worker.kernels.cpu_ops import CpuKernels, load_kernels
from gpu_worker.kernels.decode_program import MAX_SEQS as PROGRAM_MAX_SEQS
from gpu_worker.kernels.decode_program import DecodeProgram
from gpu_worker.models.config import ModelConfig
from gpu_worker.layers.distributed import get_parallel_context, rank_device
from gpu_worker.engine.plan import Command, StepPlan
from gpu_worker.layers.attention import FP8, AttentionMetadata, DecodeScratch, PrefillSpan
from gpu_worker.models.loader import load_quantized_blocks, load_weights
from gpu_worker.models.llama import LlamaForCausalLM

log = logging.getLogger("tpqueue.model_runner")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class RunnerSpec:
    """Everything a rank needs to build its runner (sent once to each rank at start)."""

    model_dir: str
    dtype: str
    device: str
    block_size: int
    num_blocks: int
    collective_timeout_s: float = 60.0  # ranks 1..: how long a collective may wait for rank 0
    max_num_seqs: int = 64               # sizes the step buffers (a larger step grows them once)
    max_num_batched_tokens: int = 1024
    calibrate: bool = True               # time attention kernels at start (bf16/fp16 on CPU); see calibration.py
    quantization: str | None = None      # weight format of the linear layers: None, "int8" or "q4"
    enforce_eager: bool = True           # False: decode steps of up to 64 sequences run compiled (compiled_decode.py)
    kv_cache_dtype: str = "auto"         # "auto": the model's dtype; "fp8": e4m3 storage (layers/attention.py)
    cpu_kernels: bool = True             # CPU, float32/bf16, eager: fused C kernels (gpu_worker/kernels); off: torch


@dataclass
class StepInputs:
    """One step's model inputs; on the CPU, views of the runner's `StepBuffers` (valid until the next step)."""

    input_ids: torch.Tensor        # [tokens]
    positions: torch.Tensor        # [tokens]
    logits_rows: torch.Tensor      # [rows] the last logit_counts[i] tokens of each sequence i
    meta: AttentionMetadata


def kv_cache_torch_dtype(dtype: str, kv_cache_dtype: str = "auto") -> torch.dtype:
    """The KV cache's storage: the model's dtype (``"auto"``) or e4m3 (``"fp8"``)."""
    return FP8 if kv_cache_dtype == "fp8" else DTYPES[dtype]


def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: str, world_size: int,
                       kv_cache_dtype: str = "auto") -> int:
    """KV-cache bytes one block takes on one rank."""
    kv_heads_local = max(1, config.num_kv_heads // world_size)
    return (2 * config.num_layers * block_size * kv_heads_local * config.head_dim
            * torch.empty(0, dtype=kv_cache_torch_dtype(dtype, kv_cache_dtype)).element_size())


class ModelRunner:
    """Builds this rank's slice of the model and KV cache; runs one forward per plan."""

    def __init__(self, spec: RunnerSpec):
        self.spec = spec
        self.device = rank_device(spec.device, get_parallel_context().rank)
        self.dtype = DTYPES[spec.dtype]
        self.config = ModelConfig.from_model_dir(Path(spec.model_dir))
        with torch.device(self.device):
            previous_dtype = torch.get_default_dtype()
            torch.set_default_dtype(self.dtype)
            try:
                self.model = LlamaForCausalLM(self.config, self.dtype).eval()
            finally:
                torch.set_default_dtype(previous_dtype)
        load_weights(self.model, Path(spec.model_dir))
        if spec.quantization == "q4":
            load_quantized_blocks(self.model, Path(spec.model_dir))
        ctx = get_parallel_context()
        compiled = not spec.enforce_eager and ctx.world_size == 1 and spec.quantization is None
        self.kernels = load_kernels() if self._kernels_apply(compiled) else None
        self.model.prepare_for_inference(spec.quantization, self.kernels)
        attn = self.model.model.layers[0].self_attn
        # kv_cache: [layers, 2, blocks, block_size, kv_heads_local, head_dim]; compiled: + a scratch block for padding
        self.kv_cache = torch.zeros(self.config.num_layers, 2, spec.num_blocks + compiled, spec.block_size,
                                    attn.num_kv_heads, attn.head_dim,
                                    dtype=kv_cache_torch_dtype(spec.dtype, spec.kv_cache_dtype), device=self.device)
        log.info("rank %d/%d: model loaded, %d KV blocks (%.0f MiB)", ctx.rank, ctx.world_size,
                 spec.num_blocks, self.kv_cache.numel() * self.kv_cache.element_size() / 2**20)
        self.max_blocks_per_seq = min(spec.num_blocks, -(-self.config.max_position_embeddings // spec.block_size))
        max_context = self.max_blocks_per_seq * spec.block_size
        seqs, tokens = spec.max_num_seqs, max(spec.max_num_batched_tokens, spec.max_num_seqs)
        self.buffers = StepBuffers(self.device, ints=tokens + 3 * seqs + seqs * self.max_blocks_per_seq + 3 * tokens,
                                   flags=seqs * max_context, counting=max(tokens, max_context))
        self.decode_scratch = DecodeScratch(self.device)
        self.use_attention_choice(attention_choice(
            AttentionShape(attn.num_heads, attn.num_kv_heads, attn.head_dim), self.dtype, self.device,
            enabled=spec.calibrate, rank=ctx.rank, kernels=self.kernels))
        self.program = self._decode_program(ctx.world_size)
        self.compiled: CompiledDecode | None = None
        self.compile_s: float | None = None  # seconds compiling (and warming) the decode path took at start
        if compiled:
            self.compiled = CompiledDecode(self.model, decode_batch_sizes(spec.max_num_seqs))
            self.compile_s = self.compiled.warm(self._decode_step)
            log.info("rank %d: decode compiled for batch sizes %s in %.1f s", ctx.rank, self.compiled.sizes,
                     self.compile_s)
        elif not spec.enforce_eager:
            log.info("rank %d: decode runs eagerly (compiled decode covers tp=1, unquantized only)", ctx.rank)

    def _decode_program(self, world_size: int) -> DecodeProgram | None:
        """The one-call decode path (`gpu_worker.kernels.decode_program`) where it covers this runner."""
        if self.kernels is None:
            return None
        reason = DecodeProgram.unsupported(self.model, self.kv_cache, world_size)
        if reason is not None:
            log.info("decode steps run op by op (the one-call decode program does not cover %s)", reason)
            return None
        log.info("decode steps of up to %d sequences run as one C call per step", PROGRAM_MAX_SEQS)
        return DecodeProgram(self.model, self.kv_cache, self.kernels, self.spec.block_size)

    def _kernels_apply(self, compiled: bool) -> bool:
        """Whether this runner's steps can use the fused CPU kernels (the compiled path traces torch ops instead)."""
        return (self.spec.cpu_kernels and self.device.type == "cpu" and not compiled
                and CpuKernels.supports(self.dtype))

    def use_attention_choice(self, choice: AttentionChoice | None) -> None:
        """Run decode attention as ``choice`` says from the next step on.

        None: the fused kernel where the kernels loaded, else the model dtype.
        """
        self.attention_choice = choice
        sizes = range(self.spec.max_num_seqs + 1)
        self._upcast = [n > 0 and choice is not None and choice.upcast(n) for n in sizes]
        self._fused = [self.kernels is not None and (choice is None or choice.fused(n)) for n in sizes]

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> torch.Tensor | None:
        """Run one step; returns float32 logits [rows, vocab] on rank 0, None on the others.

        ``rows`` is the sum of the plan's logit counts: one per sequence (its
        last position) unless a sequence asked for the logits of its whole chunk.
        """
        _, s, t, max_blocks = plan.header.tolist()
        padded = self.compiled.padded_size(s) if self.compiled is not None and s == t else None
        if padded is not None:
            return self._decode_step(plan, s, padded, max_blocks)
        inputs = self.prepare_inputs(plan)
        if self.program is not None and s == t <= PROGRAM_MAX_SEQS:
            hidden = self.program(inputs.input_ids, inputs.positions, inputs.meta)        # [seqs, hidden]
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_cache, inputs.meta)  # [tokens, hidden]
        logits = self.model.compute_logits(hidden[inputs.logits_rows])                   # [rows, vocab]
        return None if logits is None else logits.float()

    def _decode_step(self, plan: StepPlan | None, seqs: int, padded: int, max_blocks: int) -> torch.Tensor | None:
        """A decode step of ``seqs`` sequences, run compiled at ``padded`` rows (``plan`` None: padding only)."""
        host = plan.payload.numpy() if plan is not None else np.empty(0, dtype=np.int64)
        payload = pad_decode_payload(host, seqs, max_blocks, padded, self.spec.num_blocks)
        padded_plan = StepPlan(torch.tensor([Command.STEP, padded, padded, max_blocks]), torch.from_numpy(payload))
        inputs = self.prepare_inputs(padded_plan)
        hidden = self.compiled.forward(inputs.input_ids, inputs.positions, self.kv_cache, inputs.meta)
        logits = self.model.compute_logits(hidden[inputs.logits_rows[:seqs]])            # [seqs, vocab]
        return None if logits is None else logits.float()

    def prepare_inputs(self, plan: StepPlan) -> StepInputs:
        """Build one step's inputs into the preallocated buffers; every length is read from the host-side plan."""
        _, s, t, max_blocks = plan.header.tolist()                     # seqs, tokens, blocks per table row
        host = plan.payload.numpy()                                    # [payload] int64, on the CPU on every rank
        bs, decode_only = self.spec.block_size, t == s
        q_lens, ctx_lens = host[t:t + s], host[t + s:t + 2 * s]        # each [seqs]
        logit_counts = host[t + 2 * s:t + 3 * s]                       # [seqs]
        tables = host[t + 3 * s:].reshape(s, max_blocks)               # [seqs, max_blocks]
        num_decodes = s if decode_only else int(np.argmax(q_lens != 1))
        one_logit_each = decode_only or bool((logit_counts == 1).all())
        num_rows = s if one_logit_each else int(logit_counts.sum())
        decode_len = -(-int(ctx_lens[:num_decodes].max(initial=1)) // bs) * bs
        first_token = None if decode_only else np.cumsum(q_lens) - q_lens  # [seqs]
        spans = [] if decode_only else [(i, int(first_token[i]), int(q_lens[i]), int(ctx_lens[i]))
                                        for i in range(num_decodes, s)]  # (seq, first token, tokens, context)
        size, pos_at, slot_at, rows_at = host.size, host.size, host.size + t, host.size + 2 * t
        num_flags = num_decodes * decode_len + sum(n * c for _, _, n, c in spans if c != n)
        buf = self.buffers
        buf.reserve(ints=rows_at + num_rows, flags=num_flags, counting=max(t, decode_len, *(c for *_, c in spans)))
        ints, flags, counting = buf.ints_np, buf.flags_np, buf.counting

        ints[:size] = host
        positions = ints[pos_at:pos_at + t]                             # [tokens]
        if decode_only:
            np.subtract(ctx_lens, 1, out=positions)
            seq_of_token = counting[:s]                                 # [tokens]
        else:
            seq_of_token = np.repeat(counting[:s], q_lens)              # [tokens]
            np.add(np.repeat(ctx_lens - q_lens - first_token, q_lens), counting[:t], out=positions)
        block_index, offset = np.divmod(positions, bs)                  # each [tokens]
        np.add(tables[seq_of_token, block_index] * bs, offset, out=ints[slot_at:slot_at + t])
        if decode_only:  # row i is token i
            ints[rows_at:rows_at + s] = counting[:s]
        else:
            self._logits_rows(q_lens, logit_counts, one_logit_each, ints[rows_at:rows_at + num_rows])
        decode_mask = flags[:num_decodes * decode_len].reshape(num_decodes, decode_len)
        np.less(counting[:decode_len], ctx_lens[:num_decodes, None], out=decode_mask)  # [decodes, decode_len]
        if spans:
            self._prefill_masks(spans, flags, counting, num_decodes * decode_len)

        buf.upload(rows_at + num_rows, num_flags)
        tables_t = buf.ints(t + 3 * s, size, (s, max_blocks))          # [seqs, max_blocks]
        prefills = self._prefill_spans(spans, tables_t, num_decodes * decode_len) if spans else []
        size = min(num_decodes, len(self._upcast) - 1)
        meta = AttentionMetadata(
            buf.ints(slot_at, slot_at + t), num_decodes,
            tables_t if decode_only else tables_t[:num_decodes, :decode_len // bs],
            buf.flags(0, num_decodes * decode_len, (num_decodes, 1, 1, decode_len)), prefills, self._upcast[size],
            self.decode_scratch, buf.ints(t + s, t + s + num_decodes), self._fused[size])
        return StepInputs(buf.ints(0, t), buf.ints(pos_at, pos_at + t), buf.ints(rows_at, rows_at + num_rows), meta)

    @staticmethod
    def _prefill_masks(spans: list[tuple[int, int, int, int]], flags: np.ndarray, counting: np.ndarray,
                       at: int) -> None:
        """Write the mask of each prefill on top of a cached prefix into ``flags``, one after another from ``at``."""
        for _, _, n, c in spans:
            if c != n:  # query j (position c - n + j) sees keys 0..c - n + j
                mask = flags[at:at + n * c].reshape(n, c)                 # [n, c]
                np.less_equal(counting[:c], (counting[:n] + (c - n))[:, None], out=mask)
                at += n * c

    def _prefill_spans(self, spans: list[tuple[int, int, int, int]], tables: torch.Tensor,
                       at: int) -> list[PrefillSpan]:
        """The step's prefills, their masks read from the bool buffer where `_prefill_masks` wrote them."""
        prefills, bs = [], self.spec.block_size
        for i, start, n, c in spans:
            if c == n:  # nothing cached before this chunk: attend to this step's own keys
                prefills.append(PrefillSpan(start, n, c, None, None))
                continue
            mask = self.buffers.flags(at, at + n * c, (n, c))              # [n, c] bool
            prefills.append(PrefillSpan(start, n, c, tables[i, :-(-c // bs)], mask))
            at += n * c
        return prefills

    @staticmethod
    def _logits_rows(q_lens: np.ndarray, logit_counts: np.ndarray, one_each: bool, out: np.ndarray) -> None:
        """Write the token rows whose logits this step returns: each sequence's last ``logit_counts[i]`` tokens."""
        ends = np.cumsum(q_lens)                                        # [seqs]
        if one_each:
            np.subtract(ends, 1, out=out)
            return
        starts = np.repeat(ends - logit_counts, logit_counts)           # [rows] each row's sequence's first row
        within = np.arange(out.size) - np.repeat(np.cumsum(logit_counts) - logit_counts, logit_counts)
        np.add(starts, within, out=out)


def decode_batch_sizes(max_num_seqs: int) -> tuple[int, ...]:
    """The padded batch sizes decode is compiled for: `BATCH_SIZES` up to the first that holds ``max_num_seqs``."""
    fits = [size for size in BATCH_SIZES if size >= max_num_seqs]
    return tuple(size for size in BATCH_SIZES if size <= (fits[0] if fits else BATCH_SIZES[-1]))


class StepBuffers:
    """Buffers a step's index tensors are built into: allocated once, grown only for a step larger than planned.

    ``ints`` (int64) holds, per step, ``[plan payload | positions | slot mapping |
    logits rows]`` and ``flags`` (bool) the attention masks. The host side is
    written with numpy; on the CPU it is the step's tensors itself, on CUDA it is
    pinned and each step copies the used prefix to the device side in one copy
    per buffer (the next step waits for that copy before rewriting the host side).
    """

    def __init__(self, device: torch.device, ints: int, flags: int, counting: int):
        self.device = device
        self._copied: torch.cuda.Event | None = None
        self._ints = self._flags = None
        self._grow(ints, flags, counting)

    def reserve(self, ints: int, flags: int, counting: int) -> None:
        """Make room for one step's ``ints`` and ``flags`` and counting numbers up to ``counting``."""
        if self._copied is not None:
            self._copied.synchronize()
        if ints > self.ints_np.size or flags > self.flags_np.size or counting > self.counting.size:
            log.info("step buffers grow to %d ints, %d flags (a step larger than max_num_seqs / "
                     "max_num_batched_tokens planned for)", ints, flags)
            self._grow(max(ints, 2 * self.ints_np.size), max(flags, 2 * self.flags_np.size),
                       max(counting, 2 * self.counting.size))

    def upload(self, ints: int, flags: int) -> None:
        """Copy this step's first ``ints`` / ``flags`` entries to the device (nothing to do on the CPU)."""
        if self.device.type != "cuda":
            return
        self._ints[1][:ints].copy_(self._ints[0][:ints], non_blocking=True)
        self._flags[1][:flags].copy_(self._flags[0][:flags], non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()

    def ints(self, start: int, stop: int, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Entries ``[start, stop)`` of the int64 buffer as the device sees them, viewed as ``shape``."""
        return self._view(self._ints[1], self.ints_np, start, stop, shape)

    def flags(self, start: int, stop: int, shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """Entries ``[start, stop)`` of the bool buffer as the device sees them, viewed as ``shape``."""
        return self._view(self._flags[1], self.flags_np, start, stop, shape)

    def _view(self, device_side: torch.Tensor, host_side: np.ndarray, start: int, stop: int,
              shape: tuple[int, ...] | None) -> torch.Tensor:
        if self.device.type == "cuda":
            part = device_side[start:stop]
            return part if shape is None else part.view(shape)
        part = host_side[start:stop]  # from_numpy on the CPU: a third of the cost of slicing a tensor
        return torch.from_numpy(part if shape is None else part.reshape(shape))

    def _grow(self, ints: int, flags: int, counting: int) -> None:
        self._ints, self._flags = self._pair(ints, torch.int64), self._pair(flags, torch.bool)
        self.ints_np, self.flags_np = self._ints[0].numpy(), self._flags[0].numpy()
        self.counting = np.arange(counting, dtype=np.int64)            # [counting] 0, 1, 2, ...

    def _pair(self, size: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(host, device) buffers of ``size``; one tensor twice on the CPU."""
        if self.device.type != "cuda":
            host = torch.zeros(size, dtype=dtype)
            return host, host
        return torch.zeros(size, dtype=dtype, pin_memory=True), torch.zeros(size, dtype=dtype, device=self.device)
