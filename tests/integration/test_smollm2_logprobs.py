"""The real default model at tp=3: prompt and sampled-token logprobs equal transformers' log-softmax."""
import pytest
import torch

from common.sampling import SamplingParams
from gpu_worker.llm import Engine
from gpu_worker.models.tokenizer import Tokenizer
from gpu_worker.weights.model_store import resolve_model
from tests.checkpoints import load_hf_model

pytestmark = pytest.mark.slow

TOLERANCE = 1e-4  # fp32; the largest difference seen is 5e-5 (three ranks sum 30 layers in another order)
SAMPLING = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=5, prompt_logprobs=5)


def test_smollm2_tp3_logprobs_match_transformers():
    model_dir = resolve_model("smollm2-135m-instruct")
    prompt = Tokenizer(model_dir).encode_chat([{"role": "user", "content": "What is the capital of France?"}])
    with Engine("smollm2-135m-instruct", tp=3, dtype="float32", max_num_batched_tokens=16) as group:
        [result] = group.generate({"prompt_token_ids": prompt}, SAMPLING)
    ids = prompt + result.token_ids
    with torch.inference_mode():
        reference = torch.log_softmax(load_hf_model(model_dir)(torch.tensor([ids])).logits[0].float(), dim=-1)
    entries = [(result.prompt_logprobs[j], j - 1) for j in range(1, len(prompt))]
    entries += [(entry, len(prompt) - 1 + i) for i, entry in enumerate(result.logprobs)]
    worst = 0.0
    for entry, row in entries:
        assert entry.token_id == ids[row + 1]
        worst = max(worst, abs(entry.logprob - reference[row, entry.token_id].item()))
        top = reference[row].topk(5)
        assert [t for t, _ in entry.top_logprobs] == top.indices.tolist()
        worst = max(worst, max(abs(v - r) for (_, v), r in zip(entry.top_logprobs, top.values.tolist())))
    assert worst <= TOLERANCE, f"largest logprob difference {worst:.2e}"
