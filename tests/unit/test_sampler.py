"""The batched sampler (gpu_worker/engine/sampler.py) against a row-by-row reference of the same rules."""
from __future__ import annotations

import pytest
import torch

from gpu_worker.engine.sampler import UNIFORM_SCALE, sample_rows, token_seed

DRAWS = 4000
GRID = [(i + 0.5) / DRAWS for i in range(DRAWS)]  # evenly spread uniforms: inverse-CDF frequencies are exact to 1/DRAWS


def reference_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The distribution one row is drawn from, by the rules written out one token at a time. logits: [vocab]."""
    scaled = (logits / temperature).tolist()
    order = sorted(range(len(scaled)), key=lambda t: -scaled[t])
    kept = order[:top_k] if top_k > 0 else order
    mass = torch.tensor([scaled[t] for t in kept]).softmax(-1).tolist()
    nucleus, before = [], 0.0
    for token, p in zip(kept, mass):
        if before > top_p:
            break
        nucleus.append(token)
        before += p
    probs = torch.zeros(len(scaled))
    probs[nucleus] = torch.tensor([scaled[t] for t in nucleus]).softmax(-1)
    return probs


def frequencies(logits: torch.Tensor, **params) -> torch.Tensor:
    """How often each token is drawn over the grid of uniforms, the row repeated DRAWS times."""
    rows = logits.unsqueeze(0).expand(DRAWS, -1)
    drawn = sample_rows(rows, temperatures=[params["temperature"]] * DRAWS, top_ks=[params["top_k"]] * DRAWS,
                        top_ps=[params["top_p"]] * DRAWS, uniforms=GRID)
    return torch.bincount(drawn, minlength=logits.shape[0]).float() / DRAWS


LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])


@pytest.mark.parametrize("params", [
    {"temperature": 1.0, "top_k": 0, "top_p": 1.0},
    {"temperature": 0.5, "top_k": 0, "top_p": 1.0},
    {"temperature": 1.3, "top_k": 3, "top_p": 1.0},
    {"temperature": 1.0, "top_k": 0, "top_p": 0.6},
    {"temperature": 2.0, "top_k": 5, "top_p": 0.7},
    {"temperature": 1.0, "top_k": 1, "top_p": 1.0},
])
def test_draws_follow_the_filtered_distribution(params):
    expected = reference_probs(LOGITS, **params)
    assert torch.allclose(frequencies(LOGITS, **params), expected, atol=1.5 / DRAWS)


def test_a_filtered_out_token_is_never_drawn_even_at_the_top_of_the_range():
    uniforms = [0.0, 1.0 - 1e-7, 0.999999]
    drawn = sample_rows(LOGITS.expand(3, -1), temperatures=[1.0] * 3, top_ks=[2] * 3, top_ps=[1.0] * 3,
                        uniforms=uniforms)
    assert set(drawn.tolist()) <= {0, 1}


def test_a_row_draws_the_same_alone_and_beside_other_rows():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 300, generator=gen)
    params = dict(temperatures=[0.7, 1.0, 1.5, 0.9, 1.2, 1.0], top_ks=[0, 40, 0, 5, 0, 300],
                  top_ps=[1.0, 0.9, 0.5, 1.0, 0.95, 1.0], uniforms=[0.1, 0.5, 0.9, 0.33, 0.77, 0.999])
    together = sample_rows(logits, **params)
    for i in range(6):
        alone = sample_rows(logits[i:i + 1], **{name: [values[i]] for name, values in params.items()})
        assert alone.item() == together[i].item()


def test_token_seeds_are_uniform_and_keyed_by_seed_and_index():
    draws = [token_seed(7, i) * UNIFORM_SCALE for i in range(2000)]
    assert all(0.0 <= d < 1.0 for d in draws)
    assert abs(sum(draws) / len(draws) - 0.5) < 0.03
    assert token_seed(7, 3) == token_seed(7, 3) != token_seed(8, 3)


def test_a_nucleus_wider_than_the_candidates_is_cut_over_the_whole_vocabulary(monkeypatch):
    import gpu_worker.engine.sampler as sampler

    nearly_flat = -torch.arange(40) * 1e-3  # 40 about equally likely tokens: top_p 0.88 keeps 36, past 8 candidates
    monkeypatch.setattr(sampler, "CANDIDATES", 8)
    params = {"temperature": 1.0, "top_k": 0, "top_p": 0.88}
    wide = frequencies(nearly_flat, **params)
    assert torch.allclose(wide, reference_probs(nearly_flat, **params), atol=1.5 / DRAWS)
    assert (wide > 0).sum() == 36
