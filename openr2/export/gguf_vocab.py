"""Tokenizer metadata for GGUF (`gpt2` byte-level BPE as llama.cpp reads it), from our tokenizer directory.

Owns: the token list (every id of the model's vocab_size; ids without a token become `[PADi]`, UNUSED),
token types (added special -> CONTROL, added non-special such as `<think>` -> USER_DEFINED, else NORMAL),
merges, special ids, add_bos, chat template, and the pre-tokenizer name. llama.cpp picks its
pre-tokenizer regex from `tokenizer.ggml.pre`; a name whose regex differs from ours changes tokenization
silently, so the name is derived from the regexes in tokenizer.json and an unknown one is an error
(override with pre_tokenizer=... only if you know the regexes agree).
"""

from __future__ import annotations

import json
import os

from openr2.tokenizer import SPLIT_PATTERN, Tokenizer

# DeepSeek-V3 / R1's tokenizer.json: three isolated Splits, then ByteLevel without its own regex.
DEEPSEEK_V3_SPLITS = (
    "\\p{N}{1,3}",
    "[一-龥぀-ゟ゠-ヿ]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| ?[\\p{P}\\p{S}]+"
    "[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
)
# llama.cpp's "qwen2" regex is cl100k's with single digits (\p{N}): our SPLIT_PATTERN, up to possessive
# quantifiers and `\s*[\r\n]` vs `\s*[\r\n]+`, which match the same spans.
PRE_TOKENIZERS = {DEEPSEEK_V3_SPLITS: "deepseek-v3", (SPLIT_PATTERN,): "qwen2"}

TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED = 1, 3, 4, 5


def _split_regexes(pre: dict | None, path: str) -> tuple[str, ...]:
    """The Split regexes of a Sequence[Split..., ByteLevel(use_regex=False)] pre-tokenizer."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    regexes = []
    for step in steps:
        if step.get("type") == "Split" and isinstance(step.get("pattern"), dict) and "Regex" in step["pattern"]:
            regexes.append(step["pattern"]["Regex"])
        elif step.get("type") == "ByteLevel" and not step.get("use_regex", True) and not step.get("add_prefix_space"):
            continue
        else:
            raise ValueError(f"{path}: pre-tokenizer step {step.get('type')!r} has no llama.cpp equivalent here")
    return tuple(regexes)


def vocab_metadata(model_dir: str, vocab_size: int, pre_tokenizer: str | None = None) -> dict:
    """Everything the GGUF tokenizer keys need, checked before any file is written."""
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no tokenizer; a GGUF file must carry its vocabulary")
    tok = Tokenizer.from_pretrained(model_dir)
    with open(path, encoding="utf-8") as f:
        spec = json.load(f)
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise ValueError(f"{path}: model type {model.get('type')!r}; GGUF export supports byte-level BPE only")
    if pre_tokenizer is None:
        regexes = _split_regexes(spec.get("pre_tokenizer"), path)
        if regexes not in PRE_TOKENIZERS:
            raise ValueError(f"{path}: its pre-tokenizer regexes match no llama.cpp pre-tokenizer known here "
                             f"(deepseek-v3, qwen2); pass pre_tokenizer= (--pre-tokenizer) if you know the match")
        pre_tokenizer = PRE_TOKENIZERS[regexes]
    if tok.vocab_size > vocab_size:
        raise ValueError(f"{path}: {tok.vocab_size} tokens do not fit the model's vocab_size {vocab_size}")
    added = tok.backend.get_added_tokens_decoder()
    tokens, types = [], []
    for i in range(vocab_size):
        text = tok.id_to_token(i)
        if text is None:
            tokens.append(f"[PAD{i}]")
            types.append(TOKEN_UNUSED)
        else:
            tokens.append(text)
            types.append(TOKEN_NORMAL if i not in added else TOKEN_CONTROL if added[i].special else TOKEN_USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    probe = tok.encode("a", add_special_tokens=True)
    return {"pre": pre_tokenizer, "tokens": tokens, "types": types, "merges": merges,
            "bos": tok.bos_token_id, "eos": tok.eos_token_id, "pad": tok.pad_token_id,
            "add_bos": bool(probe) and probe[0] == tok.bos_token_id, "chat_template": tok.chat_template}


def write_vocab(writer, meta: dict) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(meta["pre"])
    writer.add_token_list(meta["tokens"])
    writer.add_token_types(meta["types"])
    writer.add_token_merges(meta["merges"])
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("pad", writer.add_pad_token_id)):
        if meta[key] is not None:
            add(meta[key])
    writer.add_add_bos_token(meta["add_bos"])
    writer.add_add_eos_token(False)
    if meta["chat_template"]:
        writer.add_chat_template(meta["chat_template"])
