"""bench/common.py's kernel floor: the replay repeats exactly the products a step does, no more, no less."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.common import HeavyKernelLog, heavy_kernel_replay
from openr2.model.transformer import Transformer
from openr2.presets import tiny_v3


def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_replay_repeats_every_product_of_a_training_step():
    torch.manual_seed(0)
    model = Transformer(tiny_v3())
    ids = torch.randint(0, model.config.vocab_size, (2, 12))

    def step():
        model.zero_grad(set_to_none=True)
        model(ids).logsumexp(-1).mean().backward()

    replay, n_calls = heavy_kernel_replay(step)
    step_flops = _flops(step)
    assert n_calls > 0 and step_flops > 0
    assert _flops(replay) == step_flops


def test_inference_records_linear_and_attention_whole():
    torch.manual_seed(0)
    model = Transformer(tiny_v3()).eval()
    ids = torch.randint(0, model.config.vocab_size, (2, 12))
    log = HeavyKernelLog()
    with torch.inference_mode(), log:
        model(ids)
    names = {str(func) for func, _args, _kwargs in log.calls}
    assert {"aten.linear.default", "aten.scaled_dot_product_attention.default"} <= names
    with torch.inference_mode():
        replay, _ = heavy_kernel_replay(lambda: model(ids))
        assert _flops(replay) == _flops(lambda: model(ids))
