"""Helpers for stop-string tests: a stop string placed across a token boundary of an observed output."""
from __future__ import annotations


def spanning_stop(texts: list[str], first: int = 2) -> tuple[str, int]:
    """A 3-character stop string whose first occurrence in ``"".join(texts)`` starts inside ``texts[k]``
    (each token's text) and ends in ``texts[k + 1]``; returns it and ``k``."""
    full = "".join(texts)
    for k in range(first, len(texts) - 1):
        if len(texts[k]) >= 3 and texts[k + 1]:
            stop = texts[k][-2:] + texts[k + 1][:1]
            start = len("".join(texts[:k])) + len(texts[k]) - 2
            if full.index(stop) == start:
                return stop, k
    raise AssertionError(f"no token boundary to put a stop string across in {texts!r}")
