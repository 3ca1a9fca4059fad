"""The real default model: greedy tokens equal transformers' greedy generate, at tp=1 and tp=3."""
import pytest
import torch

from common.errors import InvalidConfigError
from common.sampling import SamplingParams
from gpu_worker.weights.model_store import resolve_model
from gpu_worker.llm import Engine
from tests.checkpoints import load_hf_model

pytestmark = pytest.mark.slow

NEW_TOKENS = 32
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain in one sentence what a GPU is.",
    "List three fruits that are red.",
]


@pytest.fixture(scope="module")
def model_dir():
    return resolve_model("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def chats():
    return [[{"role": "user", "content": q}] for q in QUESTIONS]


@pytest.fixture(scope="module")
def transformers_tokens(model_dir, chats):
    """transformers' greedy continuation of each chat, EOS treated as an ordinary token."""
    from gpu_worker.models.tokenizer import Tokenizer

    tokenizer, model = Tokenizer(model_dir), load_hf_model(model_dir)
    expected = []
    for chat in chats:
        ids = torch.tensor([tokenizer.encode_chat(chat)])
        with torch.inference_mode():
            # eos_token_id=None: EOS is an ordinary token, as with our ignore_eos
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=NEW_TOKENS, eos_token_id=None, pad_token_id=2)
        expected.append(out[0, ids.shape[1]:].tolist())
    return expected


@pytest.mark.parametrize("tp", [1, 3])
def test_greedy_tokens_equal_transformers(tp, model_dir, chats, transformers_tokens):
    sampling = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)
    with Engine(str(model_dir), tp=tp) as engine:
        results = engine.generate(chats, sampling)
    assert [r.token_ids for r in results] == transformers_tokens
    assert "Paris" in results[0].text


def test_tp2_is_refused_with_the_valid_values(model_dir):
    with pytest.raises(InvalidConfigError, match="valid tp values: 1, 3, 9"):
        Engine(str(model_dir), tp=2)
