"""A worker group's model vocabulary, published once in Redis so that the gateway can name tokens.

The gateway has no tokenizer (it must not load transformers or torch), yet
logprobs answers name each token (``"token": " hello"``, ``"bytes": [...]``)
and an echoed token-id prompt is text. So at start each group writes its
model's vocabulary, every token id's bytes (:meth:`Tokenizer.token_bytes`),
to ``keys.vocab(model)``, and only when what is there differs (a content
digest): a restart, or a second group of the same model, writes nothing.

The hash's fields (read by :mod:`producer.gateway.vocab`):

=========  ====================================================================
field      value
=========  ====================================================================
format     ``1``
model      the model name, as the group registers it
count      how many ids (``0 .. count - 1``)
lengths    each id's byte length, little-endian unsigned 32-bit, ``count`` of them
data       every id's bytes, concatenated in id order
special    JSON list of the ids the detokenizer skips (``<|im_end|>`` ...)
digest     BLAKE2b-128 hex of ``lengths``, ``data`` and ``special``
=========  ====================================================================
"""
from __future__ import annotations

import hashlib
import json
import logging
import sys
from array import array
from collections.abc import Iterable, Sequence

import redis

from common import keys
from gpu_worker.models.tokenizer import Tokenizer

log = logging.getLogger(__name__)

FORMAT = "1"


def vocabulary_fields(model: str, token_bytes: Sequence[bytes], special_ids: Iterable[int]) -> dict[str, bytes]:
    """The hash fields of a vocabulary: token ``i``'s bytes at ``token_bytes[i]``."""
    lengths = array("I", (len(b) for b in token_bytes))
    assert lengths.itemsize == 4, "array('I') must be 32-bit"
    if sys.byteorder == "big":
        lengths.byteswap()
    packed_lengths, data = lengths.tobytes(), b"".join(token_bytes)
    special = json.dumps(sorted(special_ids)).encode()
    digest = hashlib.blake2b(packed_lengths + b"\0" + data + b"\0" + special, digest_size=16).hexdigest()
    return {"format": FORMAT.encode(), "model": model.encode("utf-8"), "count": str(len(token_bytes)).encode(),
            "lengths": packed_lengths, "data": data, "special": special, "digest": digest.encode()}


def publish_vocabulary(conn: redis.Redis, model: str, tokenizer: Tokenizer) -> bool:
    """Write ``tokenizer``'s vocabulary as ``model``'s unless Redis holds the same; True if it wrote."""
    fields = vocabulary_fields(model, tokenizer.vocabulary_bytes(), tokenizer.special_token_ids)
    key = keys.vocab(model)
    if conn.hget(key, "digest") == fields["digest"]:
        return False
    with conn.pipeline(transaction=True) as pipe:
        pipe.delete(key)  # no field of an older format survives
        pipe.hset(key, mapping=fields)  # type: ignore[arg-type]
        pipe.execute()
    log.info("published the vocabulary of %s (%d ids, %d bytes) at %s", model, len(fields["lengths"]) // 4,
             len(fields["data"]), key)
    return True
