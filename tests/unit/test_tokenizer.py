"""Tokenizer and IncrementalDetokenizer on a tiny byte-level BPE tokenizer trained here (no network)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from common.errors import InvalidRequestError, ModelNotFoundError
from common.results import ChatMessage
from gpu_worker.models.tokenizer import IncrementalDetokenizer, Tokenizer

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PLAIN_ADDED_TOKEN = "<tool call>"  # added, not special: kept by skip_special_tokens
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
USER_FIRST = (
    "{% if messages[0]['role'] != 'user' %}{{ raise_exception('the first message must be from the user') }}"
    "{% endif %}" + CHATML
)
TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog. Hello world, hello there!",
    "Café, naïve, résumé, déjà vu: é è ê ü ö ñ ç.",
    "日本語のテキスト 東京 こんにちは 你好世界",
    "🙂 🚀 👍 emoji 🙂🙂 — “quotes” €5",
]
SAMPLE = "Héllo wörld 🙂🚀 日本語 — déjà vu 👍🏽 €"


def write_tokenizer_dir(out_dir: Path, chat_template: str | None = CHATML) -> Path:
    """Train a tiny byte-level BPE (ids 0-2 special) and save it with config/generation_config eos ids."""
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    raw.train_from_iterator(TRAINING_TEXT, trainer)
    raw.add_tokens([PLAIN_ADDED_TOKEN])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                      pad_token="<|im_end|>", unk_token="<|endoftext|>", chat_template=chat_template)
    out_dir.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(out_dir)
    (out_dir / "config.json").write_text(json.dumps({"eos_token_id": 0}))
    (out_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    return out_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tokenizer_dir(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tok(model_dir: Path) -> Tokenizer:
    return Tokenizer(model_dir)


def stream(tok: Tokenizer, ids: list[int], prompt_ids: list[int] | None = None,
           skip_special_tokens: bool = True) -> list[str]:
    """Every delta of one sequence, the flush last."""
    detok = tok.detokenizer(prompt_ids, skip_special_tokens=skip_special_tokens)
    return [detok.push(i) for i in ids] + [detok.flush()]


def single_byte_ids(tok: Tokenizer) -> list[int]:
    """Ids of the 256 one-byte tokens: lone lead and continuation bytes make partial UTF-8."""
    return [i for i in range(tok.vocab_size)
            if i not in tok.special_token_ids and len(tok.token_string(i)) == 1]


# --- Tokenizer ---------------------------------------------------------------------------------


def test_encode_adds_no_special_tokens_and_round_trips(tok: Tokenizer) -> None:
    ids = tok.encode(SAMPLE)
    assert not set(ids) & tok.special_token_ids
    assert tok.decode(ids) == SAMPLE


def test_encode_rejects_non_text(tok: Tokenizer) -> None:
    with pytest.raises(InvalidRequestError, match="must be a str"):
        tok.encode([1, 2])  # type: ignore[arg-type]


def test_encode_chat_matches_transformers(tok: Tokenizer, model_dir: Path) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Café? 🙂"}]
    expected = PreTrainedTokenizerFast.from_pretrained(model_dir).apply_chat_template(
        messages, add_generation_prompt=True, return_dict=False)
    assert tok.encode_chat(messages) == expected
    assert tok.encode_chat([ChatMessage(**m) for m in messages]) == expected
    assert tok.render_chat(messages).endswith("<|im_end|>\n<|im_start|>assistant\n")


@pytest.mark.parametrize(("messages", "fragment"), [
    ([], "at least one message"),
    ("hello", "must be a list"),
    ([{"role": "robot", "content": "hi"}], "message 0 is malformed.*role"),
    ([{"role": "user"}], "message 0 is malformed.*content"),
    ([{"role": "user", "content": "hi", "name": "x"}], "message 0 is malformed.*name"),
    ([{"role": "user", "content": "hi"}, ("user", "hi")], "message 1 is a tuple"),
])
def test_encode_chat_rejects_malformed_messages(tok: Tokenizer, messages, fragment: str) -> None:
    with pytest.raises(InvalidRequestError, match=fragment):
        tok.encode_chat(messages)


def test_encode_chat_without_template(tmp_path: Path) -> None:
    tok = Tokenizer(write_tokenizer_dir(tmp_path, chat_template=None))
    assert tok.chat_template is None
    with pytest.raises(InvalidRequestError, match="no chat template"):
        tok.encode_chat([{"role": "user", "content": "hi"}])


def test_template_exception_becomes_invalid_request(tmp_path: Path) -> None:
    tok = Tokenizer(write_tokenizer_dir(tmp_path, chat_template=USER_FIRST))
    assert tok.encode_chat([{"role": "user", "content": "hi"}])
    with pytest.raises(InvalidRequestError, match="first message must be from the user"):
        tok.encode_chat([{"role": "assistant", "content": "hi"}])


def test_eos_ids_are_the_union_of_config_generation_config_and_tokenizer(tok: Tokenizer) -> None:
    assert tok.eos_token_ids == frozenset({0, 2, 5})


def test_vocab_size_counts_added_tokens(tok: Tokenizer) -> None:
    assert tok.token_string(tok.vocab_size - 1) == PLAIN_ADDED_TOKEN
    assert tok.token_string(tok.vocab_size) is None


def test_missing_tokenizer_is_model_not_found(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="tokenizer"):
        Tokenizer(tmp_path)


def test_decode_skips_special_tokens_by_default(tok: Tokenizer) -> None:
    ids = [1] + tok.encode("hi") + [2]
    assert tok.decode(ids) == "hi"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>hi<|im_end|>"


# --- IncrementalDetokenizer ----------------------------------------------------------------------


def test_multibyte_characters_are_held_until_complete(tok: Tokenizer) -> None:
    ids = tok.encode(SAMPLE)
    deltas = stream(tok, ids)
    assert "".join(deltas) == SAMPLE
    assert not any("\ufffd" in d for d in deltas)
    assert "" in deltas[:-1], "the sample should split some character across tokens"


def test_unfinished_character_is_flushed_as_decode_shows_it(tok: Tokenizer) -> None:
    emoji = tok.encode("🚀")
    assert len(emoji) > 1
    detok = tok.detokenizer()
    assert [detok.push(i) for i in emoji[:-1]] == [""] * (len(emoji) - 1)
    assert detok.flush() == tok.decode(emoji[:-1])
    assert detok.flush() == ""


def test_special_and_unknown_ids(tok: Tokenizer) -> None:
    ids = [1] + tok.encode("a 🙂") + [tok.vocab_size - 1, 2, tok.vocab_size + 7]
    for skip in (True, False):
        assert "".join(stream(tok, ids, skip_special_tokens=skip)) == tok.decode(ids, skip_special_tokens=skip)
    assert tok.detokenizer().push(2) == ""
    assert tok.detokenizer(skip_special_tokens=False).push(2) == "<|im_end|>"


def test_prompt_context(tok: Tokenizer) -> None:
    prompt, generated = tok.encode("Say: café"), tok.encode(" déjà 🙂 vu")
    full = tok.decode(prompt + generated)
    assert "".join(stream(tok, generated, prompt_ids=prompt)) == full[len(tok.decode(prompt)):]


def test_push_decodes_only_a_small_window(tok: Tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    windows: list[int] = []
    join = tok.join_tokens
    monkeypatch.setattr(tok, "join_tokens", lambda tokens: windows.append(len(tokens)) or join(tokens))
    ids = tok.encode(SAMPLE * 50)
    detok = IncrementalDetokenizer(tok)
    text = "".join(detok.push(i) for i in ids) + detok.flush()
    assert text == SAMPLE * 50
    assert max(windows) <= 8, "push must not re-decode the whole sequence"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data(), skip=st.booleans())
def test_deltas_join_to_decode_for_any_ids(tok: Tokenizer, data: st.DataObject, skip: bool) -> None:
    any_id = st.integers(0, tok.vocab_size - 1)
    byte_id = st.sampled_from(single_byte_ids(tok))
    ids = data.draw(st.lists(st.one_of(any_id, byte_id, byte_id), max_size=40))
    deltas = stream(tok, ids, skip_special_tokens=skip)
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=skip)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.text(max_size=20), text=st.text(
    alphabet=st.one_of(st.characters(codec="utf-8", exclude_categories=["Cs"]), st.sampled_from("é日🙂👍🏽€ ")),
    max_size=40))
def test_valid_text_streams_without_replacement_chars(tok: Tokenizer, prompt: str, text: str) -> None:
    ids = tok.encode(text)
    deltas = stream(tok, ids, prompt_ids=tok.encode(prompt))
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas) or "\ufffd" in text
