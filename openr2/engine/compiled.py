"""The compiled decode step (EngineConfig.compile): one graph for "B rows, T new tokens each" (decode rows, 1 + k
tokens when a row carries drafts to verify).

At small batch a decode step is dispatch-bound: hundreds of small eager ops at a few microseconds each cost
more than the matmuls. Inductor fuses the elementwise work (norms, rope, softmax, routing) into a few C++
kernels and leaves the matmuls to MKL. Shapes are dynamic (rows, context length), so a model compiles
once per shape class (one row, as an AOTInductor package; several rows, with torch.compile), not once
per length.

The step reads and writes the engine's paged pool directly: `DecodeView` is the paged cache of a
decode-only step, built from plain tensors so that it can live inside the compiled region. Its reads go
through the block tables in place (engine/paged_attention.py's kernel, an opaque op to the compiler), so no
context is copied inside the graph.
"""

from __future__ import annotations

import os
import tempfile
import types
import warnings
import weakref

import torch

from openr2.engine import paged_attention
from openr2.model.transformer import Transformer

COMPILED_DECODE_MAX_TOKENS = 16  # the compiled decode step's largest batch (more rows run eager)


class DecodeView:
    """The cache of a decode-only step over rows padded to T new tokens: the valid tokens (flat index
    `write_index` into [B * T]) go to pool slots `write_slots`; row b reads keys 0..positions[b, t] through
    `block_table[b]` (blocks of `block_size` slots). read: "blocks" (in place) or "gather" (the reference:
    each row's context copied out first, as before the in-place read)."""

    def __init__(self, pool_c: torch.Tensor, pool_r: torch.Tensor, block_table: torch.Tensor,
                 write_slots: torch.Tensor, write_index: torch.Tensor, block_size: int, read: str = "blocks"):
        self.pool_c, self.pool_r, self.block_table = pool_c, pool_r, block_table
        self.write_slots, self.write_index, self.block_size, self.read_impl = write_slots, write_index, block_size, read

    def write(self, layer_idx: int, c_kv: torch.Tensor, k_rope: torch.Tensor) -> None:
        # Written into the whole pool tensor, not into a per-layer view of it: compiled, a write through a
        # view becomes a copy of the entire pool per layer (~70 ms/step at 64 MB), this one a scatter.
        layer = torch.full_like(self.write_slots, layer_idx)
        self.pool_c.index_put_((layer, self.write_slots), c_kv.flatten(0, 1)[self.write_index].to(self.pool_c.dtype))
        self.pool_r.index_put_((layer, self.write_slots), k_rope.flatten(0, 1)[self.write_index].to(self.pool_r.dtype))

    def read(self, layer_idx: int):
        raise NotImplementedError("the compiled decode step runs absorbed attention only")

    def attend(self, layer_idx: int, q_latent: torch.Tensor, q_rope: torch.Tensor, positions: torch.Tensor,
               scale: float) -> torch.Tensor:
        args = (q_latent, q_rope, self.pool_c, self.pool_r, layer_idx, self.block_table, positions,
                self.block_size, scale)
        if self.read_impl == "blocks" and paged_attention.kernel_reads(self.pool_c):
            return paged_attention.paged_latent_attention(*args)
        # every key of the tables (the mask hides those past each query): no size that depends on data
        slots = paged_attention.block_slots(self.block_table, self.block_size, self.block_table.shape[1] * self.block_size)
        return paged_attention.gather_latent_attention(*args, slots=slots)

    def advance(self, num_tokens: int) -> None:
        """Lengths live in the engine's sequences."""


def decode_step(model: Transformer, ids: torch.Tensor, positions: torch.Tensor, pool_c: torch.Tensor,
                pool_r: torch.Tensor, block_table: torch.Tensor, write_slots: torch.Tensor,
                write_index: torch.Tensor, block_size: int, read: str = "blocks") -> torch.Tensor:
    """ids/positions [B, T], block_table [B, W], write_slots/write_index [number of valid new tokens] (as
    PagedView.decode_args gives them) -> logits of every new position [B, T, V] (absorbed MLA).

    B is at most COMPILED_DECODE_MAX_TOKENS. The implementations are the ones inductor fuses: the experts'
    host-sync-free `decode` path and the `compiled` kernels (model/layers.py: one row on CPU as a product
    and a sum, int8 weights likewise); run eagerly (the tests' reference) they give the same numbers."""
    view = DecodeView(pool_c, pool_r, block_table, write_slots, write_index, block_size, read)
    return model(ids, positions, cache=view, attn_impl="absorbed", moe_impl="decode", kernel_impl="compiled")


class CompiledDecode:
    """The compiled decode step of one model.

    One row (the latency case) runs through an AOTInductor package on CPU: the same inductor kernels as
    torch.compile's, called from C++ without dynamo's Python wrapper around them (~0.35 ms less per step on
    a 6-layer model). The package holds no weights: it reads the model's own tensors (user-managed
    constants), so in-place weight updates, as GRPO's, are seen. 2..16 rows (and one row on other
    devices, or if export fails) run through torch.compile.
    """

    def __init__(self, model: Transformer):
        self.model = model
        paged_attention.load()  # the in-place read's kernel, registered before anything is traced
        self._multi = _compile_decode_step()
        self._single = None
        self._single_key = None  # (new tokens per row, block size): what the package was exported for
        self._package_dir: tempfile.TemporaryDirectory | None = None

    def __call__(self, ids, positions, pool_c, pool_r, block_table, write_slots, write_index,
                 block_size) -> torch.Tensor:
        """decode_step's arguments after the model (PagedView.decode_args gives the cache's)."""
        args = [ids, positions, pool_c, pool_r, block_table, write_slots, write_index]
        if ids.shape[0] == 1 and ids.device.type == "cpu":
            if self._single is None:
                self._single_key = (ids.shape[1], block_size)
                self._single = self._export_single(*args, block_size)
            if self._single is not False and (ids.shape[1], block_size) == self._single_key:
                # the package's loader directly: its Python __call__ re-parses the call spec and flattens
                # the arguments on every call (~50 us a step)
                return self._single.loader.boxed_run(args)[0]
        return self._multi(self.model, *args, block_size)

    def _export_single(self, *example):
        """AOTInductor package of the one-row step (context length and pool size dynamic); False if the
        model does not export (then torch.compile serves one row too)."""
        try:
            with warnings.catch_warnings():  # torch's own export/packaging trips its LeafSpec deprecation
                warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
                return self._build_package(*example)
        except Exception as e:  # export covers what torch.compile does; if not, that path still works
            warnings.warn(f"one-row decode not exported ({type(e).__name__}: {str(e)[:200]}); using torch.compile",
                          stacklevel=2)
            return False

    def _build_package(self, *example):
        *tensors, block_size = example
        step = _Step(self.model, block_size)
        # the pool size and the block table width dynamic (PagedView pads tables to at least two columns);
        # one row with a fixed number of new tokens, so its writes are static
        blocks, slots = torch.export.Dim("blocks", min=2), torch.export.Dim("slots")
        shapes = (None, None, {1: slots}, {1: slots}, {1: blocks}, None, None)
        program = torch.export.export(step, tuple(tensors), dynamic_shapes=shapes, strict=False)
        self._package_dir = tempfile.TemporaryDirectory(prefix="openr2-decode-")
        path = torch._inductor.aoti_compile_and_package(
            program, package_path=os.path.join(self._package_dir.name, "decode.pt2"),
            inductor_configs={"aot_inductor.package_constants_in_so": False})
        runner = torch._inductor.aoti_load_package(path)
        tensors = dict(step.named_parameters()) | dict(step.named_buffers())
        runner.load_constants({name: tensors[name] for name in runner.get_constant_fqns()},
                              check_full_update=True, user_managed=True)
        return runner


class _Step(torch.nn.Module):
    def __init__(self, model: Transformer, block_size: int):
        super().__init__()
        self.model, self.block_size = model, block_size

    def forward(self, ids, positions, pool_c, pool_r, block_table, write_slots, write_index):
        return decode_step(self.model, ids, positions, pool_c, pool_r, block_table, write_slots, write_index,
                           self.block_size)


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled_decode_step(model: Transformer) -> CompiledDecode:
    """The compiled decode step of this model (engines on the same model share its graphs)."""
    if model not in _COMPILED:
        _COMPILED[model] = CompiledDecode(model)
    return _COMPILED[model]


def _compile_decode_step():
    """`decode_step` under torch.compile, for one model.

    The function gets a private copy of its code object, so its compiled graphs live in a cache of its own
    (torch.compile caches per code object). That makes it safe to skip the per-call guards on the model's
    modules (~370 us -> ~90 us per step on a 6-layer model): the weights are read at each call (in-place
    updates, as GRPO's, are seen), and no other model can ever reach these graphs. fullgraph: a graph break
    would put model code frames in the shared cache; the engine falls back to eager instead.
    """
    code = decode_step.__code__.replace()
    private = types.FunctionType(code, decode_step.__globals__, "decode_step", decode_step.__defaults__)
    return torch.compile(private, dynamic=True, fullgraph=True,
                         options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
                                  "cpp_wrapper": True})
