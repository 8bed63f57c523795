"""Test helper: a saved tiny chat checkpoint (random perturbed V3 model + the tiny BPE tokenizer)."""

from __future__ import annotations

import dataclasses

import torch

from openr2.checkpoints import save_model
from openr2.model.transformer import build_model
from openr2.presets import tiny_v3
from tests.tokenizer_utils import tiny_tokenizer


def save_tiny_chat_checkpoint(path, tokenizer=None) -> None:
    """The tiny chat model over `tokenizer` (default: the tiny BPE), its vocabulary sized to fit."""
    tokenizer = tokenizer or tiny_tokenizer()
    config = dataclasses.replace(tiny_v3(), vocab_size=tokenizer.vocab_size, num_nextn_predict_layers=0,
                                 eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    model = build_model(config, seed=3)
    with torch.no_grad():  # a fresh init is nearly uniform; make greedy choices clear-cut
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.3)
    save_model(model, path)
    tokenizer.save_pretrained(path)
