"""One rank's model, KV cache and forward pass, driven by step plans."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from gpu_worker.models.config import ModelConfig
from gpu_worker.layers.distributed import get_parallel_context, rank_device
from gpu_worker.engine.plan import StepPlan
from gpu_worker.layers.attention import AttentionMetadata, PrefillSpan
from gpu_worker.models.loader import load_weights
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


@dataclass
class StepInputs:
    input_ids: torch.Tensor        # [tokens]
    positions: torch.Tensor        # [tokens]
    logits_rows: torch.Tensor      # [rows] the last logit_counts[i] tokens of each sequence i
    meta: AttentionMetadata


def kv_bytes_per_block(config: ModelConfig, block_size: int, dtype: str, world_size: int) -> int:
    """KV-cache bytes one block takes on one rank."""
    kv_heads_local = max(1, config.num_kv_heads // world_size)
    return (2 * config.num_layers * block_size * kv_heads_local * config.head_dim
            * torch.empty(0, dtype=DTYPES[dtype]).element_size())


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
        self.model.prepare_for_inference()
        attn = self.model.model.layers[0].self_attn
        # kv_cache: [layers, 2, blocks, block_size, kv_heads_local, head_dim]
        self.kv_cache = torch.zeros(self.config.num_layers, 2, spec.num_blocks, spec.block_size,
                                    attn.num_kv_heads, attn.head_dim, dtype=self.dtype, device=self.device)
        ctx = get_parallel_context()
        log.info("rank %d/%d: model loaded, %d KV blocks (%.0f MiB)", ctx.rank, ctx.world_size,
                 spec.num_blocks, self.kv_cache.numel() * self.kv_cache.element_size() / 2**20)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> torch.Tensor | None:
        """Run one step; returns float32 logits [rows, vocab] on rank 0, None on the others.

        ``rows`` is the sum of the plan's logit counts: one per sequence (its
        last position) unless a sequence asked for the logits of its whole chunk.
        """
        inputs = self.prepare_inputs(plan)
        hidden = self.model(inputs.input_ids, inputs.positions, self.kv_cache, inputs.meta)  # [tokens, hidden]
        logits = self.model.compute_logits(hidden[inputs.logits_rows])                   # [rows, vocab]
        return None if logits is None else logits.float()

    def prepare_inputs(self, plan: StepPlan) -> StepInputs:
        _, num_seqs, num_tokens, max_blocks = plan.header.tolist()
        payload = plan.payload.to(self.device)
        input_ids = payload[:num_tokens]
        query_lens = payload[num_tokens:num_tokens + num_seqs]
        context_lens = payload[num_tokens + num_seqs:num_tokens + 2 * num_seqs]
        logit_counts = plan.payload[num_tokens + 2 * num_seqs:num_tokens + 3 * num_seqs].tolist()  # on the CPU
        block_tables = payload[num_tokens + 3 * num_seqs:].view(num_seqs, max_blocks)
        bs = self.spec.block_size

        if num_tokens == num_seqs:  # decode-only step: one token per sequence
            seq_of_token, positions = torch.arange(num_seqs, device=self.device), context_lens - 1
        else:
            seq_of_token = torch.repeat_interleave(torch.arange(num_seqs, device=self.device), query_lens)
            first_token = torch.cumsum(query_lens, 0) - query_lens
            offsets = torch.arange(num_tokens, device=self.device) - first_token[seq_of_token]
            positions = (context_lens - query_lens)[seq_of_token] + offsets
        slot_mapping = block_tables[seq_of_token, positions // bs] * bs + positions % bs
        q_lens, ctx_lens = query_lens.tolist(), context_lens.tolist()
        logits_rows = self._logits_rows(q_lens, logit_counts, query_lens)
        num_decodes = next((i for i, q in enumerate(q_lens) if q != 1), num_seqs)
        decode_blocks = -(-max(ctx_lens[:num_decodes], default=1) // bs)
        decode_tables = block_tables[:num_decodes, :decode_blocks]
        key_index = torch.arange(decode_blocks * bs, device=self.device)
        decode_mask = (key_index < context_lens[:num_decodes, None]).view(num_decodes, 1, 1, len(key_index))
        prefills = [self._prefill_span(i, q_lens, ctx_lens, block_tables) for i in range(num_decodes, num_seqs)]
        meta = AttentionMetadata(slot_mapping, num_decodes, decode_tables, decode_mask, prefills)
        return StepInputs(input_ids, positions, logits_rows, meta)

    def _logits_rows(self, q_lens: list[int], logit_counts: list[int], query_lens: torch.Tensor) -> torch.Tensor:
        """The token rows whose logits this step returns: each sequence's last ``logit_counts[i]`` tokens."""
        if all(c == 1 for c in logit_counts):
            return torch.cumsum(query_lens, 0) - 1
        rows, end = [], 0
        for q, c in zip(q_lens, logit_counts):
            end += q
            rows.extend(range(end - c, end))
        return torch.tensor(rows, dtype=torch.int64, device=self.device)

    def _prefill_span(self, i: int, q_lens: list[int], ctx_lens: list[int], block_tables) -> PrefillSpan:
        n, ctx = q_lens[i], ctx_lens[i]
        token_start = sum(q_lens[:i])
        if ctx == n:  # nothing cached before this chunk: attend to this step's own keys
            return PrefillSpan(token_start, n, ctx, None, None)
        blocks = -(-ctx // self.spec.block_size)
        query_pos = torch.arange(ctx - n, ctx, device=self.device)
        mask = torch.arange(ctx, device=self.device)[None, :] <= query_pos[:, None]  # [n, ctx]
        return PrefillSpan(token_start, n, ctx, block_tables[i, :blocks], mask)
