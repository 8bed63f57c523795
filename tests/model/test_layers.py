"""layers.linear: the product-and-sum form of compiled one-row decode (kernel_impl "compiled") equals F.linear."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from openr2.model.layers import linear
from tests.numerics import assert_close_to_reference


def test_compiled_one_row_linear_equals_f_linear():
    gen = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(96, 160, generator=gen), torch.randn(96, generator=gen)
    compiled = torch.compile(lambda x: linear(x, weight, bias, kernel_impl="compiled"), fullgraph=True, dynamic=False)
    with torch.no_grad():
        for shape in [(1, 160), (1, 1, 160), (3, 160)]:  # one row (product and sum), several rows (F.linear)
            x = torch.randn(shape, generator=gen)
            ref = F.linear(x.double(), weight.double(), bias.double())
            assert_close_to_reference(compiled(x), F.linear(x, weight, bias), ref, what=f"linear, x {shape}")
