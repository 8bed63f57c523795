"""The DeepSeek-V2/V3 model as pure math: (input_ids, positions, cache) -> logits. No requests, no I/O."""
