"""Tokenizer: training, special tokens, save/load (ours and transformers'), errors, streaming decode."""

from __future__ import annotations

import json
import os
import random

import pytest

from openr2.chat_format import render_chat
from openr2.tokenizer import (
    ASSISTANT,
    BOS,
    EOS,
    THINK_END,
    THINK_START,
    TOOL_TOKENS,
    USER,
    StreamDecoder,
    Tokenizer,
    train_bpe,
)
from tests.tokenizer_utils import RARE_TEXTS, tiny_tokenizer

CHAT_TEXT = f"{BOS}Be brief.{USER}What is 12+30?{ASSISTANT}{THINK_START}\nadd\n{THINK_END}\n\n42{EOS}"
TEXTS = ["hello world", "  leading and trailing  ", "line1\nline2\r\n\ttab", "1234567890", "",
         CHAT_TEXT, *RARE_TEXTS]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return tiny_tokenizer()


def test_round_trip(tok):
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text


def test_digits_are_single_tokens(tok):
    assert len(tok.encode("1234567890")) == 10


def test_special_and_added_tokens_are_single_ids(tok):
    for t in (BOS, EOS, USER, ASSISTANT, THINK_START, THINK_END, *TOOL_TOKENS):
        assert tok.encode(t) == [tok.token_to_id(t)], t
        assert tok.id_to_token(tok.token_to_id(t)) == t
    ids = tok.encode(CHAT_TEXT)
    for t in (BOS, USER, ASSISTANT, THINK_START, THINK_END, EOS):
        assert ids.count(tok.token_to_id(t)) == 1
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 1)
    assert tok.special_token_ids == {tok.token_to_id(t) for t in (BOS, EOS, USER, ASSISTANT)}
    # <think> is added but not special (as in DeepSeek's vocab): skip_special_tokens keeps it.
    assert tok.decode(ids, skip_special_tokens=True) == "Be brief.What is 12+30?<think>\nadd\n</think>\n\n42"


def test_add_special_tokens_prepends_bos(tok):
    assert tok.encode("hi", add_special_tokens=True) == [tok.bos_token_id] + tok.encode("hi")


def test_vocab_size_and_pad_token(tok):
    assert tok.vocab_size <= 512 and len(tok) == tok.vocab_size
    with pytest.raises(ValueError, match="vocab_size"):
        train_bpe(["abc"], vocab_size=100)
    padded = train_bpe(["some text"] * 10, vocab_size=300, pad_token="<pad>")
    assert padded.pad_token_id == padded.token_to_id("<pad>") and padded.pad_token_id in padded.special_token_ids


def test_save_load_round_trip(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    again = Tokenizer.from_pretrained(tmp_path)
    for text in TEXTS:
        assert again.encode(text) == tok.encode(text)
        assert again.encode(text, add_special_tokens=True) == tok.encode(text, add_special_tokens=True)
    assert (again.bos_token, again.eos_token, again.pad_token) == (BOS, EOS, EOS)
    assert again.special_token_ids == tok.special_token_ids and again.vocab_size == tok.vocab_size
    assert again.chat_template == tok.chat_template is not None
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config["bos_token"] == BOS and isinstance(config["chat_template"], str)


def test_transformers_loads_our_save(tok, tmp_path):
    transformers = pytest.importorskip("transformers")
    tok.save_pretrained(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    for text in TEXTS:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
        assert hf.encode(text) == tok.encode(text, add_special_tokens=True)
        assert hf.decode(tok.encode(text)) == text
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
            {"role": "assistant", "content": "<think>\nr\n</think>\n\nA1"}, {"role": "user", "content": "Q2"}]
    for kwargs in ({}, {"thinking": False}):
        assert hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=True, **kwargs) == \
            render_chat(chat, tok, **kwargs) == render_chat(chat, **kwargs)


def test_from_pretrained_config_variants(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    cfg_path = tmp_path / "tokenizer_config.json"
    config = json.loads(cfg_path.read_text(encoding="utf-8"))
    config["bos_token"] = {"__type": "AddedToken", "content": BOS, "lstrip": False}
    config["eos_token"] = {"content": EOS}
    config["chat_template"] = [{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T"}]
    config["added_tokens_decoder"]["9999"] = {"content": "<extra>", "special": True}
    cfg_path.write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    again = Tokenizer.from_pretrained(tmp_path)
    assert (again.bos_token, again.eos_token) == (BOS, EOS)
    assert again.chat_template == "D" and again.chat_templates["tool_use"] == "T"
    assert again.encode("<extra>") == [again.token_to_id("<extra>")]
    assert again.token_to_id("<extra>") in again.special_token_ids
    # Newer transformers keep the template in chat_template.jinja instead of the config.
    del config["chat_template"]
    cfg_path.write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "chat_template.jinja").write_text("J", encoding="utf-8")
    assert Tokenizer.from_pretrained(tmp_path).chat_template == "J"


def test_from_pretrained_errors(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path / "nowhere")
    tok.save_pretrained(tmp_path)
    cfg_path, tok_path = tmp_path / "tokenizer_config.json", tmp_path / "tokenizer.json"
    good_cfg = cfg_path.read_text(encoding="utf-8")
    os.remove(cfg_path)
    with pytest.raises(FileNotFoundError, match="tokenizer_config.json"):
        Tokenizer.from_pretrained(tmp_path)
    cfg_path.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.from_pretrained(tmp_path)
    for key, value in (("eos_token", "<missing>"), ("bos_token", 5), ("chat_template", {"x": 1})):
        cfg_path.write_text(json.dumps({**json.loads(good_cfg), key: value}), encoding="utf-8")
        with pytest.raises(ValueError, match=key):
            Tokenizer.from_pretrained(tmp_path)
    cfg_path.write_text(good_cfg, encoding="utf-8")
    tok_path.write_text('{"version": "1.0", "model": ', encoding="utf-8")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


def _stream(tok, ids, **kwargs):
    dec = StreamDecoder(tok, **kwargs)
    deltas = [dec.add(i) for i in ids]
    return deltas, dec.flush()


def test_stream_decoder_multibyte(tok):
    split_somewhere = False
    for text in [*RARE_TEXTS, CHAT_TEXT, " ".join(RARE_TEXTS)]:
        ids = tok.encode(text)
        split_somewhere |= any("\ufffd" in tok.decode([i]) for i in ids)
        deltas, tail = _stream(tok, ids)
        assert "".join(deltas) + tail == tok.decode(ids) == text
        assert tail == "" and not any("\ufffd" in d for d in deltas)
    assert split_somewhere, "the test texts must split some characters over several tokens"


def test_stream_decoder_skip_special_and_reuse(tok):
    ids = tok.encode(CHAT_TEXT + "🦀")
    deltas, tail = _stream(tok, ids, skip_special_tokens=True)
    assert "".join(deltas) + tail == tok.decode(ids, skip_special_tokens=True)


def test_stream_decoder_random_bytes_and_bounded_window(tok):
    # Random ids include lone continuation bytes and cut characters: exact even when UTF-8 is broken.
    rng = random.Random(0)
    ids = [rng.randrange(tok.vocab_size) for _ in range(3000)]
    widths = []
    real_decode = tok.decode
    dec = StreamDecoder(tok)
    dec._decode = lambda window: (widths.append(len(window)), real_decode(window))[1]
    out = "".join(dec.add(i) for i in ids) + dec.flush()
    assert out == tok.decode(ids)
    assert max(widths) <= 16  # each step decodes a short window, not the whole text
