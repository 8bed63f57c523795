"""`LLM`: the offline API, shaped like vLLM's: generate(prompts, params) and chat(messages, params).

    llm = openr2.LLM("path/to/checkpoint")
    outs = llm.generate(["Hello", {"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=32))
    outs[0].outputs[0].text, .token_ids, .finish_reason
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from openr2.engine.engine import EngineConfig, LLMEngine, RequestError, RequestOutput
from openr2.engine.sampling import SamplingParams
from openr2.model.transformer import Transformer


class LLM:
    def __init__(self, model: str | os.PathLike | Transformer, tokenizer=None, dtype: torch.dtype = torch.float32,
                 device: str = "cpu", compile: bool = True, **engine_options):
        """engine_options: EngineConfig's fields. compile (default on, as vLLM's CUDA graphs are): the decode
        step is compiled on first use (~20-60 s once; kept on disk) and then runs several times faster."""
        config = EngineConfig(compile=compile, **engine_options)
        if isinstance(model, Transformer):
            self.engine = LLMEngine(model, tokenizer, config)
        else:
            self.engine = LLMEngine.from_pretrained(os.fspath(model), config, dtype, device)
            if tokenizer is not None:
                self.engine.tokenizer = tokenizer
        self._next_id = 0

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = False) -> list[RequestOutput]:
        """Complete each prompt (a string, token ids, or {"prompt_token_ids": [...]}); outputs in input order.
        Raises RequestError if one of them fails inside the engine."""
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params if isinstance(sampling_params, Sequence) else [sampling_params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"sampling_params: {len(params)} given for {len(prompts)} prompts")
        ids = []
        try:
            for prompt, p in zip(prompts, params):
                ids.append(f"llm-{self._next_id}")
                self._next_id += 1
                self.engine.add_request(ids[-1], prompt, p or SamplingParams())
        except ValueError:
            for request_id in ids:
                self.engine.abort(request_id)
            raise
        done: dict[str, RequestOutput] = {}
        wanted = set(ids)
        with tqdm(total=len(ids), disable=not use_tqdm, desc="generate", unit="req") as bar:
            while len(done) < len(ids):
                for out in self.engine.step():
                    if out.error is not None and out.request_id in wanted:  # the others are not worth finishing
                        for request_id in ids:
                            self.engine.abort(request_id)
                        raise RequestError(f"request {out.request_id} failed") from out.error
                    if out.finished and out.request_id in wanted:
                        done[out.request_id] = out
                        bar.update(1)
        return [done[i] for i in ids]

    def chat(self, messages, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = False, **template_options) -> list[RequestOutput]:
        """One conversation (a list of message dicts) or a list of them, rendered with the chat template."""
        from openr2.chat_format import encode_chat

        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer (tokenizer.json in the checkpoint directory)")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [{"prompt_token_ids": encode_chat(c, self.tokenizer, **template_options)} for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)
