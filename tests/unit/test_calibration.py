"""Attention dtype calibration: the cache file round trip, when it applies, and both paths' outputs."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from common.sampling import SamplingParams
from gpu_worker.engine import calibration
from gpu_worker.engine.calibration import BATCHES, AttentionChoice, AttentionShape, attention_choice, cache_key
from gpu_worker.engine.model_runner import ModelRunner, RunnerSpec
from gpu_worker.kernels.host_cpu import cpu_model_name
from gpu_worker.engine.plan import pack_step
from gpu_worker.engine.sequence import Sequence
from gpu_worker.layers.attention import DecodeScratch, decode_attention
from gpu_worker.layers.distributed import ParallelContext, set_parallel_context
from tests.checkpoints import hf_reference_logits
from tests.parity import BLOCK_SIZE, NUM_BLOCKS, paged_logits

SHAPE = AttentionShape(num_heads=2, num_kv_heads=1, head_dim=16)   # small: a real measurement takes little time
CPU = torch.device("cpu")
BF16_RMS = 0.06   # a bf16 tiny random model's logits off float32's, relative RMS (about twice what is measured)


def relative_rms(x: torch.Tensor, reference: torch.Tensor) -> float:
    return ((x - reference).pow(2).mean().sqrt() / reference.pow(2).mean().sqrt()).item()


@pytest.fixture
def measurements(monkeypatch) -> list[AttentionShape]:
    """Counts real measurements (each call of `calibration.measure` appends its shape)."""
    calls, real = [], calibration.measure
    monkeypatch.setattr(calibration, "measure",
                        lambda shape, dtype, kernels=None: calls.append(shape) or real(shape, dtype, kernels))
    monkeypatch.delenv(calibration.CALIBRATE_ENV, raising=False)
    return calls


def test_a_second_start_reads_the_cache_and_another_cpu_measures_again(tmp_path, measurements, caplog):
    caplog.set_level(logging.INFO, logger="tpqueue.calibration")
    first = attention_choice(SHAPE, torch.bfloat16, CPU, cache_dir=tmp_path, cpu_name="Test CPU A")
    assert len(measurements) == 1 and [b for b, _ in first.upcast_by_batch] == list(BATCHES)
    saved = json.loads((tmp_path / "calibration.json").read_text())
    assert list(saved) == [cache_key(SHAPE, torch.bfloat16, "Test CPU A")]
    assert [(c["batch"], c["upcast"]) for c in next(iter(saved.values()))] == list(first.upcast_by_batch)
    assert "measured" in caplog.text and "float32" in caplog.text and " us" in caplog.text

    again = attention_choice(SHAPE, torch.bfloat16, CPU, cache_dir=tmp_path, cpu_name="Test CPU A")
    assert again == first and len(measurements) == 1
    assert "from " + str(tmp_path / "calibration.json") in caplog.text

    attention_choice(SHAPE, torch.bfloat16, CPU, cache_dir=tmp_path, cpu_name="Test CPU B")
    attention_choice(AttentionShape(4, 1, 16), torch.bfloat16, CPU, cache_dir=tmp_path, cpu_name="Test CPU A")
    assert len(measurements) == 3
    assert len(json.loads((tmp_path / "calibration.json").read_text())) == 3


def test_the_cached_choice_is_what_counts(tmp_path, measurements):
    """A start trusts the file: a cached choice wins over what this machine would measure."""
    key = cache_key(SHAPE, torch.bfloat16, "Test CPU")
    cases = [{"batch": b, "model_dtype_us": 1.0, "float32_us": 2.0, "fused_us": None, "upcast": b == 32,
              "fused": False} for b in BATCHES]
    (tmp_path / "calibration.json").write_text(json.dumps({key: cases}))
    choice = attention_choice(SHAPE, torch.bfloat16, CPU, cache_dir=tmp_path, cpu_name="Test CPU")
    assert choice == AttentionChoice(((1, False), (32, True)), ((1, False), (32, False))) and not measurements


def test_a_broken_cache_is_measured_again_and_rewritten(tmp_path, measurements):
    (tmp_path / "calibration.json").write_text("{not json")
    attention_choice(SHAPE, torch.bfloat16, CPU, cache_dir=tmp_path, cpu_name="Test CPU")
    key = cache_key(SHAPE, torch.bfloat16, "Test CPU")
    (tmp_path / "calibration.json").write_text(json.dumps({key: [{"batch": 1}]}))
    attention_choice(SHAPE, torch.bfloat16, CPU, cache_dir=tmp_path, cpu_name="Test CPU")
    assert len(measurements) == 2 and len(json.loads((tmp_path / "calibration.json").read_text())[key]) == 2


@pytest.mark.parametrize("dtype, device, env, enabled", [
    (torch.float32, CPU, None, True),                     # float32 has nothing to upcast to
    (torch.bfloat16, torch.device("cuda"), None, True),   # CUDA skips it
    (torch.bfloat16, CPU, "0", True),                     # TPQ_CALIBRATE=0
    (torch.float16, CPU, None, False),                    # RunnerSpec(calibrate=False)
])
def test_no_calibration_where_it_does_not_apply(tmp_path, measurements, monkeypatch, dtype, device, env, enabled):
    if env is not None:
        monkeypatch.setenv(calibration.CALIBRATE_ENV, env)
    assert attention_choice(SHAPE, dtype, device, enabled=enabled, cache_dir=tmp_path) is None
    assert not measurements and not (tmp_path / "calibration.json").exists()


def test_a_batch_takes_the_choice_of_the_nearest_measured_batch():
    choice = AttentionChoice(((1, False), (32, True)))
    assert [choice.upcast(b) for b in (1, 2, 5, 6, 32, 200)] == [False, False, False, True, True, True]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch", BATCHES)
def test_both_paths_agree_within_the_dtype_rounding(dtype, batch):
    gen = torch.Generator().manual_seed(batch)
    q = torch.randn(batch, 6, 1, 32, generator=gen).to(dtype)                                  # [b, heads, 1, dim]
    keys, values = (torch.randn(batch, 200, 2, 32, generator=gen).to(dtype) for _ in range(2))  # [b, ctx, kv, dim]
    mask = (torch.arange(200) < torch.randint(1, 201, (batch, 1), generator=gen)).view(batch, 1, 1, 200)
    exact = decode_attention(q.double(), keys.double(), values.double(), mask, upcast=False)  # [b, heads, 1, dim]
    for upcast, scratch in [(False, None), (True, None), (True, DecodeScratch(CPU))]:
        out = decode_attention(q, keys, values, mask, upcast, scratch)
        assert out.dtype == dtype and out.shape == (batch, 6, 1, 32)
        assert (out.double() - exact).abs().max() <= 2 * torch.finfo(dtype).eps * exact.abs().max().clamp(min=1)


@pytest.mark.parametrize("path", ["bf16", "float32", "fused"])
def test_bfloat16_runner_matches_transformers_on_every_path(tiny_llama_dir, tmp_path, monkeypatch, path):
    """A bf16 runner takes its choice from the cache (written beforehand); each path is within bf16 of fp32.

    ``fused``: the fused CPU kernel's attention, reading the cache blocks in place.
    """
    set_parallel_context(ParallelContext(0, 1))
    monkeypatch.setenv("TPQ_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv(calibration.CALIBRATE_ENV, raising=False)
    upcast, fused = path == "float32", path == "fused"
    key = cache_key(AttentionShape(4, 2, 16), torch.bfloat16, cpu_model_name(), fused=True)
    cases = [{"batch": b, "model_dtype_us": 1.0, "float32_us": 1.0, "fused_us": 1.0, "upcast": upcast,
              "fused": fused} for b in BATCHES]
    (tmp_path / "calibration.json").write_text(json.dumps({key: cases}))
    runner = ModelRunner(RunnerSpec(str(tiny_llama_dir), "bfloat16", "cpu", BLOCK_SIZE, NUM_BLOCKS))
    assert runner.kernels is not None  # the other fused kernels run on every path; attention is the choice
    assert runner.attention_choice == AttentionChoice(tuple((b, upcast) for b in BATCHES),
                                                      tuple((b, fused) for b in BATCHES))
    assert runner._fused[1] == runner._fused[6] == fused

    token_ids = torch.randint(0, 500, (24,), generator=torch.Generator().manual_seed(4)).tolist()
    reference = hf_reference_logits(tiny_llama_dir, token_ids)                               # [24, vocab]
    logits, positions = paged_logits(runner.execute, token_ids, prefill_chunks=[9, 5])       # 10 decodes
    assert relative_rms(logits, reference[positions]) <= BF16_RMS                           # measured: 0.034
    assert (logits.argmax(-1) == reference[positions].argmax(-1)).float().mean() >= 0.75      # measured: 11 of 12
    seqs = [Sequence(f"s{i}", token_ids[:10 + i], SamplingParams(temperature=0)) for i in range(6)]
    for i, seq in enumerate(seqs):
        seq.block_table = [16 + 8 * i + b for b in range(4)]   # clear of paged_logits' blocks 5..10
    batch = pack_step(seqs, [len(s.token_ids) for s in seqs], BLOCK_SIZE)
    runner.execute(batch)
    for seq in seqs:
        seq.num_computed_tokens = len(seq.token_ids)
        seq.append_token(token_ids[len(seq.token_ids)])
    decoded = runner.execute(pack_step(seqs, [1] * 6, BLOCK_SIZE))                         # [6, vocab], one batch
    expected = reference[[10 + i for i in range(6)]]
    assert relative_rms(decoded, expected) <= BF16_RMS                                       # measured: 0.030


def test_an_unwritable_cache_dir_still_measures(tmp_path, measurements):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache dir would be")
    choice = attention_choice(SHAPE, torch.bfloat16, CPU, cache_dir=blocker, cpu_name="Test CPU")
    assert choice is not None and len(measurements) == 1


def test_refresh_measures_again_over_the_cached_entry(tmp_path, measurements, monkeypatch):
    key = cache_key(SHAPE, torch.bfloat16, "Test CPU")
    stale = [{"batch": b, "model_dtype_us": 1.0, "float32_us": 2.0, "fused_us": None, "upcast": False,
              "fused": False} for b in BATCHES]
    (tmp_path / "calibration.json").write_text(json.dumps({key: stale}))
    monkeypatch.setenv(calibration.CALIBRATE_ENV, "refresh")
    attention_choice(SHAPE, torch.bfloat16, CPU, cache_dir=tmp_path, cpu_name="Test CPU")
    assert len(measurements) == 1
    assert json.loads((tmp_path / "calibration.json").read_text())[key] != stale


def test_with_the_kernels_the_fused_attention_is_measured_and_the_fastest_path_wins(tmp_path, measurements):
    from gpu_worker.kernels.cpu_ops import load_kernels

    kernels = load_kernels()
    assert kernels is not None
    choice = attention_choice(SHAPE, torch.bfloat16, CPU, cache_dir=tmp_path, cpu_name="Test CPU", kernels=kernels)
    (entry,) = json.loads((tmp_path / "calibration.json").read_text()).items()
    assert entry[0] == cache_key(SHAPE, torch.bfloat16, "Test CPU", fused=True)
    for case in entry[1]:
        times = {"model": case["model_dtype_us"], "float32": case["float32_us"], "fused": case["fused_us"]}
        fastest = min(times, key=times.get)
        assert (case["fused"], case["upcast"]) == (fastest == "fused", fastest == "float32")
        assert choice.fused(case["batch"]) == case["fused"] and choice.upcast(case["batch"]) == case["upcast"]
