"""Tokenizer: a thin wrapper over HF `tokenizers` that knows DeepSeek's special tokens and chat template.

Owns DeepSeek-V3/R1's special tokens (BOS, EOS, the chat markers, `<think>` / `</think>`, the tool-call
and fill-in-the-middle markers: every other module takes them from here), the chat template a trained tokenizer stores (the
jinja twin of chat_format's built-in renderer; tests hold the two equal), loading/saving the HF layout
(tokenizer.json + tokenizer_config.json, readable by transformers' AutoTokenizer too), training a small
byte-level BPE with DeepSeek's chat tokens (`train_bpe`), and incremental detokenisation for streaming
(`StreamDecoder`). It does not render chats (chat_format.py).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, processors, trainers

BOS = "<｜begin▁of▁sentence｜>"  # fullwidth ｜ (U+FF5C) and ▁ (U+2581), as in DeepSeek's vocab
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"
TOOL_CALLS_BEGIN, TOOL_CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
TOOL_OUTPUTS_BEGIN, TOOL_OUTPUTS_END = "<｜tool▁outputs▁begin｜>", "<｜tool▁outputs▁end｜>"
TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END = "<｜tool▁output▁begin｜>", "<｜tool▁output▁end｜>"
# Fill-in-the-middle (DeepSeek-V3's and DeepSeek-Coder's vocab): BOS FIM_BEGIN prefix FIM_HOLE suffix FIM_END,
# then the model writes the middle. train_bpe does not add them: a tokenizer has them or it has no FIM.
FIM_BEGIN, FIM_HOLE, FIM_END = "<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"
TOOL_TOKENS = (TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP,
               TOOL_OUTPUTS_BEGIN, TOOL_OUTPUTS_END, TOOL_OUTPUT_BEGIN, TOOL_OUTPUT_END)

# The built-in format as jinja, stored by train_bpe so transformers' apply_chat_template (and any other
# jinja consumer) renders exactly what `_render_builtin` does; tests hold the two equal.
DEFAULT_CHAT_TEMPLATE = """\
{#- openr2 DeepSeek-R1 chat format; same output as openr2.chat_format's built-in renderer. -#}
{%- set ns = namespace(system='', has_system=false, in_outputs=false, outputs_seen=false) -%}
{%- for message in messages if message['role'] == 'system' -%}
  {%- set ns.system = ns.system + ('\\n\\n' if ns.has_system else '') + message['content'] -%}
  {%- set ns.has_system = true -%}
{%- endfor -%}
{{- bos_token + ns.system -}}
{%- for message in messages -%}
  {%- if message['role'] == 'user' -%}
    {%- if ns.in_outputs -%}{{- '<｜tool▁outputs▁end｜>' -}}{%- set ns.in_outputs = false -%}{%- endif -%}
    {{- '<｜User｜>' + message['content'] -}}
  {%- elif message['role'] == 'assistant' -%}
    {%- if ns.in_outputs -%}{{- '<｜tool▁outputs▁end｜>' -}}{%- set ns.in_outputs = false -%}
    {%- else -%}{{- '<｜Assistant｜>' -}}{%- endif -%}
    {{- (message['content'] or '').split('</think>')[-1] -}}
    {%- if message['tool_calls'] -%}
      {%- set ns.outputs_seen = false -%}
      {{- '<｜tool▁calls▁begin｜>' -}}
      {%- for call in message['tool_calls'] -%}
        {{- ('\\n' if not loop.first else '') + '<｜tool▁call▁begin｜>' + call['type'] + '<｜tool▁sep｜>'
            + call['function']['name'] + '\\n```json\\n' + call['function']['arguments'] + '\\n```<｜tool▁call▁end｜>' -}}
      {%- endfor -%}
      {{- '<｜tool▁calls▁end｜>' -}}
    {%- endif -%}
    {{- '<｜end▁of▁sentence｜>' -}}
  {%- elif message['role'] == 'tool' -%}
    {%- if not ns.outputs_seen -%}{{- '<｜tool▁outputs▁begin｜>' -}}{%- set ns.outputs_seen = true -%}{%- endif -%}
    {%- set ns.in_outputs = true -%}
    {{- '<｜tool▁output▁begin｜>' + message['content'] + '<｜tool▁output▁end｜>' -}}
  {%- endif -%}
{%- endfor -%}
{%- if ns.in_outputs -%}{{- '<｜tool▁outputs▁end｜>' -}}
{%- elif add_generation_prompt -%}
  {{- '<｜Assistant｜>' + ('<think>\\n' if thinking is not defined or thinking else '') -}}
{%- endif -%}
"""

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"  # where newer transformers save the template instead of the config

# GPT-4-style split, but one digit per token (\p{N} instead of \p{N}{1,3}): arithmetic is learned per
# digit, as in LLaMA-style tokenizers and nanochat's HF path.
SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
                 r"""|\s*[\r\n]|\s+(?!\S)|\s+""")


def _token_str(value: Any, key: str, path: str) -> str | None:
    """Config token fields are a string, an AddedToken dict ({"content": ...}), or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{path}: {key} must be a string or an object with 'content', got {value!r}")


def _templates(value: Any, path: str) -> dict[str, str]:
    """chat_template is one string, or a list of {"name", "template"} (the one named 'default' is used)."""
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                       and isinstance(t.get("template"), str) for t in value):
        return {t["name"]: t["template"] for t in value}
    raise ValueError(f"{path}: chat_template must be a string or a list of {{'name', 'template'}} objects")


class Tokenizer:
    """`tokenizers.Tokenizer` plus the special tokens and chat template from tokenizer_config.json."""

    def __init__(self, tok: tokenizers.Tokenizer, bos_token: str | None = BOS, eos_token: str | None = EOS,
                 pad_token: str | None = None, chat_template: str | dict[str, str] | None = None,
                 config: dict | None = None, source: str = "<memory>"):
        self._tok = tok
        self.bos_token, self.eos_token = bos_token, eos_token
        self.pad_token = pad_token if pad_token is not None else eos_token
        self.chat_templates = _templates(chat_template, source) if not isinstance(chat_template, dict) \
            else dict(chat_template)
        self._config = dict(config or {})  # other tokenizer_config.json keys, written back on save
        for key in ("bos_token", "eos_token", "pad_token"):
            token = getattr(self, key)
            if token is not None and tok.token_to_id(token) is None:
                raise ValueError(f"{source}: {key} {token!r} is not in the vocabulary")
        self._special_ids = frozenset(i for i, t in tok.get_added_tokens_decoder().items() if t.special)

    # ---------------------------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Tokenizer:
        """Load `path/tokenizer.json` and `path/tokenizer_config.json` (both required: without the config
        there is no EOS or chat template, and SFT silently never learns to stop)."""
        path = os.fspath(path)
        tok_path, cfg_path = os.path.join(path, TOKENIZER_FILE), os.path.join(path, CONFIG_FILE)
        for p in (tok_path, cfg_path):
            if not os.path.isfile(p):
                raise FileNotFoundError(f"{p}: no such file (a tokenizer directory needs {TOKENIZER_FILE} and {CONFIG_FILE})")
        try:
            tok = tokenizers.Tokenizer.from_file(tok_path)
        except Exception as e:  # the Rust side raises a bare Exception on bad JSON or unknown components
            raise ValueError(f"{tok_path}: cannot load tokenizer: {e}") from e
        try:
            with open(cfg_path, encoding="utf-8") as f:
                config = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{cfg_path}: not valid JSON: {e}") from e
        if not isinstance(config, dict):
            raise ValueError(f"{cfg_path}: expected a JSON object")
        # Tokens listed only in the config (transformers allows that) must exist in the tokenizer too.
        decoder = config.pop("added_tokens_decoder", None) or {}
        if not isinstance(decoder, dict):
            raise ValueError(f"{cfg_path}: added_tokens_decoder must be an object of id -> token")
        for tid, spec in sorted(decoder.items(), key=lambda kv: int(kv[0])):
            content = _token_str(spec, f"added_tokens_decoder[{tid}]", cfg_path)
            if content is not None and tok.token_to_id(content) is None:
                special = isinstance(spec, dict) and bool(spec.get("special", False))
                added = AddedToken(content, special=special, normalized=False)
                (tok.add_special_tokens if added.special else tok.add_tokens)([added])
        template: Any = config.pop("chat_template", None)
        jinja_path = os.path.join(path, TEMPLATE_FILE)
        if template is None and os.path.isfile(jinja_path):
            with open(jinja_path, encoding="utf-8") as f:
                template = f.read()
        tokens = {k: _token_str(config.pop(k, None), k, cfg_path) for k in ("bos_token", "eos_token", "pad_token")}
        return cls(tok, chat_template=_templates(template, cfg_path), config=config, source=cfg_path, **tokens)

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write tokenizer.json and tokenizer_config.json, loadable here and by transformers' AutoTokenizer."""
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        self._tok.save(os.path.join(path, TOKENIZER_FILE))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                  **self._config, "bos_token": self.bos_token, "eos_token": self.eos_token,
                  "pad_token": self.pad_token,
                  "added_tokens_decoder": {
                      str(i): {"content": t.content, "lstrip": t.lstrip, "normalized": t.normalized,
                               "rstrip": t.rstrip, "single_word": t.single_word, "special": t.special}
                      for i, t in sorted(self._tok.get_added_tokens_decoder().items())}}
        if self.chat_templates:
            names = list(self.chat_templates)
            config["chat_template"] = self.chat_templates["default"] if names == ["default"] else \
                [{"name": n, "template": t} for n, t in self.chat_templates.items()]
        tmp = os.path.join(path, CONFIG_FILE + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(config, f, ensure_ascii=False, indent=2)
            f.write("\n")
        os.replace(tmp, os.path.join(path, CONFIG_FILE))

    # ---------------------------------------------------------------------------------------- vocabulary
    @property
    def backend(self) -> tokenizers.Tokenizer:
        return self._tok

    @property
    def vocab_size(self) -> int:
        """All ids, added tokens included: the embedding table needs this many rows (at least)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def bos_token_id(self) -> int | None:
        return None if self.bos_token is None else self._tok.token_to_id(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return None if self.eos_token is None else self._tok.token_to_id(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return None if self.pad_token is None else self._tok.token_to_id(self.pad_token)

    @property
    def special_token_ids(self) -> frozenset[int]:
        """Ids of added tokens marked special (dropped by decode(skip_special_tokens=True))."""
        return self._special_ids

    @property
    def chat_template(self) -> str | None:
        return self.chat_templates.get("default")

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    # ---------------------------------------------------------------------------------------- text
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Text -> ids. Special and added token strings in the text become their single ids; with
        add_special_tokens the tokenizer's post-processor adds its tokens (BOS for ours)."""
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r})"


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2, pad_token: str | None = None,
              chat_template: str | None = DEFAULT_CHAT_TEMPLATE) -> Tokenizer:
    """Train a byte-level BPE with DeepSeek's chat tokens; the result has at most vocab_size ids in all.

    Special (ids 0-3): BOS, EOS (also the pad token unless pad_token is given), `<｜User｜>`,
    `<｜Assistant｜>`. Added but not special (kept by skip_special_tokens, as in DeepSeek's vocab):
    `<think>`, `</think>` and the tool-call markers, so each is one id. Encoding with
    add_special_tokens=True prepends BOS. The chat template stored is the built-in R1 format.
    """
    specials = [BOS, EOS, USER, ASSISTANT] + ([pad_token] if pad_token not in (None, BOS, EOS, USER, ASSISTANT) else [])
    added = [THINK_START, THINK_END, *TOOL_TOKENS]
    min_size = 256 + len(specials) + len(added) + 1
    if vocab_size < min_size:
        raise ValueError(f"vocab_size={vocab_size}: must be at least {min_size} (256 bytes + chat tokens + 1 merge)")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(added), min_frequency=min_frequency,
                                  special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, bos_id)])
    return Tokenizer(tok, BOS, EOS, pad_token or EOS, chat_template)


class StreamDecoder:
    """Incremental detokenisation: add(token_id) returns only new, complete text.

    Byte-level tokens can end inside a UTF-8 character; decoding then yields U+FFFD. Like vLLM and HF's
    TextStreamer, text is held back while the decoded tail is U+FFFD, and each step decodes only a short
    window: the ids since the last emission plus the ids of the emission before (so decoders that treat
    the first token specially see the same context). The concatenated deltas plus flush() equal
    decode(all ids).
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # window start: first id of the previous emission
        self._read = 0  # ids before this are emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""  # nothing yet, or a character still incomplete
        self._prefix, self._read = self._read, len(self._ids)
        # Drop ids that can never be in a window again, so memory stays bounded on long streams.
        if self._prefix > 1024:
            del self._ids[:self._prefix]
            self._read -= self._prefix
            self._prefix = 0
        return new_text[len(prefix_text):]

    def flush(self) -> str:
        """End of stream: emit whatever was held back (a truly broken byte sequence stays U+FFFD)."""
        prefix_text = self._decode(self._ids[self._prefix:self._read])
        new_text = self._decode(self._ids[self._prefix:])
        self._ids, self._prefix, self._read = [], 0, 0
        return new_text[len(prefix_text):]
