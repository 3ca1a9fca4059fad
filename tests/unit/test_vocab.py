"""A model's vocabulary from the worker's tokenizer to the gateway: token bytes, the Redis hash, the cache."""
from __future__ import annotations

import asyncio
from pathlib import Path

import fakeredis
import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models
from transformers import PreTrainedTokenizerFast

from common import keys
from gpu_worker.models.tokenizer import Tokenizer
from gpu_worker.serve.vocab_publish import publish_vocabulary, vocabulary_fields
from producer.gateway.vocab import TextOffsets, Vocabulary, VocabularyCache, VocabularyError, parse_vocabulary
from tests.unit.test_tokenizer import PLAIN_ADDED_TOKEN, SAMPLE, write_tokenizer_dir


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer(write_tokenizer_dir(tmp_path_factory.mktemp("tok")))


def test_byte_level_token_bytes_join_to_the_text(tok: Tokenizer) -> None:
    for text in (SAMPLE, "hello world\n\ttabs  and  spaces", "<|im_end|> after a special"):
        ids = tok._hf.encode(text)
        assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8"), text
    assert any(len(tok.token_bytes(i)) == 1 and tok.token_bytes(i)[0] >= 0x80 for i in range(tok.vocab_size))
    assert tok.token_bytes(tok._hf.convert_tokens_to_ids("<|im_end|>")) == b"<|im_end|>"
    added = tok._hf.convert_tokens_to_ids(PLAIN_ADDED_TOKEN)
    assert tok.token_bytes(added) == PLAIN_ADDED_TOKEN.encode()  # its space is a space, not a byte-level 'Ġ'
    assert tok.token_bytes(tok.vocab_size + 5) is None
    assert len(tok.vocabulary_bytes()) == tok.vocab_size


def test_sentencepiece_byte_fallback_tokens_are_their_bytes(tmp_path: Path) -> None:
    vocab = {"<unk>": 0, "<0xE2>": 1, "<0x82>": 2, "<0xAC>": 3, "\u2581hi": 4, "x": 5}
    raw = RawTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    raw.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="<unk>").save_pretrained(tmp_path)
    spm = Tokenizer(tmp_path)
    assert [spm.token_bytes(i) for i in range(1, 6)] == [b"\xe2", b"\x82", b"\xac", b" hi", b"x"]
    assert b"".join(spm.token_bytes(i) for i in (4, 1, 2, 3)).decode() == " hi\u20ac"


def test_a_published_vocabulary_reads_back_the_same(tok: Tokenizer, fake_redis) -> None:
    assert publish_vocabulary(fake_redis, "tiny", tok) is True
    vocab = parse_vocabulary(fake_redis.hgetall(keys.vocab("tiny")))
    assert (vocab.model, vocab.size) == ("tiny", tok.vocab_size)
    assert [vocab.bytes_of(i) for i in range(vocab.size)] == tok.vocabulary_bytes()
    assert vocab.special_ids == tok.special_token_ids
    ids = tok._hf.encode(SAMPLE)
    assert vocab.decode(ids) == SAMPLE
    assert publish_vocabulary(fake_redis, "tiny", tok) is False  # the same digest: nothing written


def test_a_changed_vocabulary_replaces_the_old_one(fake_redis) -> None:
    class Fake:
        special_token_ids = frozenset({0})

        def __init__(self, tokens: list[bytes]) -> None:
            self.tokens = tokens

        def vocabulary_bytes(self) -> list[bytes]:
            return self.tokens

    assert publish_vocabulary(fake_redis, "m", Fake([b"<s>", b"a", b"b"]))
    assert publish_vocabulary(fake_redis, "m", Fake([b"<s>", b"a", b"c", b"d"]))
    vocab = parse_vocabulary(fake_redis.hgetall(keys.vocab("m")))
    assert [vocab.bytes_of(i) for i in range(vocab.size)] == [b"<s>", b"a", b"c", b"d"]


def test_a_damaged_vocabulary_hash_is_refused_by_name() -> None:
    fields = vocabulary_fields("m", [b"a", b"bc"], [])
    with pytest.raises(VocabularyError, match="inconsistent"):
        parse_vocabulary({**fields, "data": b"abcd"})
    with pytest.raises(VocabularyError, match="format"):
        parse_vocabulary({**fields, "format": b"9"})
    with pytest.raises(VocabularyError, match="unreadable"):
        parse_vocabulary({k: v for k, v in fields.items() if k != "lengths"})


def test_tokens_are_named_by_their_text_or_their_bytes() -> None:
    vocab = Vocabulary("m", [b" caf", b"\xc3", b"\xa9", b"\xf0\x9f", b"<|im_end|>"], special_ids=[4])
    assert vocab.token_text(0) == " caf"
    assert vocab.token_text(1) == "bytes:\\xc3" and vocab.token_text(3) == "bytes:\\xf0\\x9f"
    assert vocab.decode([0, 1, 2]) == " café" and vocab.decode([3]) == "\ufffd"
    assert vocab.bytes_of(99) == b"" and vocab.unknown_ids([0, 99, 5, 99, -1]) == [-1, 5, 99]


def test_text_offsets_count_whole_characters_and_skip_specials_when_told() -> None:
    vocab = Vocabulary("m", [b" caf", b"\xc3", b"\xa9", b"!", b"<|im_end|>"], special_ids=[4])
    offsets = TextOffsets(vocab)
    assert [offsets.add(i) for i in (0, 1, 2, 3, 4, 3)] == [0, 4, 4, 5, 6, 16]
    generated = TextOffsets(vocab, 10, count_special=False)
    assert [generated.add(i) for i in (3, 4, 3)] == [10, 11, 11]


def test_the_cache_reads_redis_once_and_notices_a_new_digest() -> None:
    server = fakeredis.FakeServer()
    sync = fakeredis.FakeRedis(server=server)
    conn = fakeredis.FakeAsyncRedis(server=server)
    sync.hset(keys.vocab("m"), mapping=vocabulary_fields("m", [b"a", b"b"], []))

    async def go() -> None:
        lazy, eager = VocabularyCache(recheck_s=3600), VocabularyCache(recheck_s=0)
        assert await lazy.get(conn, "other") is None and lazy.peek("m") is None
        first = await lazy.get(conn, "m")
        assert first is not None and first.size == 2 and lazy.peek("m") is first
        assert (await eager.get(conn, "m")).size == 2
        sync.hset(keys.vocab("m"), mapping=vocabulary_fields("m", [b"a", b"b", b"c"], []))
        assert await lazy.get(conn, "m") is first  # within recheck_s: no Redis round trip
        assert (await eager.get(conn, "m")).size == 3
        sync.delete(keys.vocab("m"))
        assert (await eager.get(conn, "m")).size == 3  # what it read still holds
        await conn.aclose()

    asyncio.run(go())


def test_a_worker_takes_prompt_token_ids_as_they_are_and_refuses_unknown_ones(tok: Tokenizer) -> None:
    from common.errors import InvalidRequestError
    from common.schemas import GenerationRequest
    from gpu_worker.serve.jobs import prompt_token_ids

    ids = [2, 1, 2, tok.vocab_size - 1]  # special ids too: nothing is added, nothing dropped
    assert prompt_token_ids(tok, GenerationRequest(prompt_token_ids=ids)) == ids
    with pytest.raises(InvalidRequestError, match=rf"outside this model's vocabulary \[0, {tok.vocab_size}\).*"
                                                  rf"{tok.vocab_size + 3}"):
        prompt_token_ids(tok, GenerationRequest(prompt_token_ids=[5, tok.vocab_size + 3]))
