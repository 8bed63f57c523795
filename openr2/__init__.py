"""openr2: an open, private DeepSeek-R2-class reasoning system.

Public API (imported lazily so `import openr2` and `openr2 --help` stay instant):
    load_model(path, dtype=torch.float32, device="cpu") -> model;  model(input_ids) -> logits
    save_model(model, path)
    ModelConfig.from_pretrained(path)
    LLM(path).generate(prompts, SamplingParams(...)) / .chat(messages, ...)   (vLLM-style offline API)
    SamplingParams(structured_outputs=StructuredOutputsParams(json=schema))  (constrained decoding)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = ["LLM", "ModelConfig", "SamplingParams", "StructuredOutputsParams", "load_model", "save_model"]

if TYPE_CHECKING:
    from openr2.checkpoints import load_model, save_model
    from openr2.config import ModelConfig
    from openr2.engine.grammar import StructuredOutputsParams
    from openr2.engine.llm import LLM
    from openr2.engine.sampling import SamplingParams


def __getattr__(name: str):
    if name == "ModelConfig":
        from openr2.config import ModelConfig

        return ModelConfig
    if name in ("load_model", "save_model"):
        from openr2 import checkpoints

        return getattr(checkpoints, name)
    if name == "LLM":
        from openr2.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from openr2.engine.sampling import SamplingParams

        return SamplingParams
    if name == "StructuredOutputsParams":
        from openr2.engine.grammar import StructuredOutputsParams

        return StructuredOutputsParams
    raise AttributeError(f"module 'openr2' has no attribute {name!r}")
