"""The compiled decode step (EngineConfig.compile): one graph for "B rows, one new token each".

At small batch a decode step is dispatch-bound: hundreds of small eager ops at a few microseconds each cost
more than the matmuls. Inductor fuses the elementwise work (norms, rope, softmax, routing) into a few C++
kernels and leaves the matmuls to MKL. Shapes are dynamic (rows, context length), so a model compiles
once per shape class (one row, as an AOTInductor package; several rows, with torch.compile), not once
per length.

The step reads and writes the engine's paged pool directly: `DecodeView` is the paged cache of a
decode-only step, built from plain tensors so that it can live inside the compiled region. The MTP draft
step (`draft_step`, speculative decoding) is compiled the same way.
"""

from __future__ import annotations

import os
import tempfile
import types
import warnings
import weakref

import torch

from openr2.model.transformer import Transformer

COMPILED_DECODE_MAX_TOKENS = 16  # the compiled decode step's largest batch (more rows run eager)
COMPILED_DECODE_MAX_WIDTH = 4  # tokens per row: one and up to three drafts

class DecodeView:
    """The cache of a decode-only step: row b writes its new tokens to pool slots `write_slots[b]` [T] and
    reads its context through `gather[b]` (slots, padded with slot 0 beyond the row's length; masked by
    position)."""

    def __init__(self, pool_c: torch.Tensor, pool_r: torch.Tensor, gather: torch.Tensor, write_slots: torch.Tensor):
        self.pool_c, self.pool_r, self.gather, self.write_slots = pool_c, pool_r, gather, write_slots

    def update(self, layer_idx: int, c_kv: torch.Tensor, k_rope: torch.Tensor):
        # Written into the whole pool tensor, not into a per-layer view of it: compiled, a write through a
        # view becomes a copy of the entire pool per layer (~70 ms/step at 64 MB), this one a scatter.
        layer = torch.full_like(self.write_slots, layer_idx)
        self.pool_c.index_put_((layer, self.write_slots), c_kv.to(self.pool_c.dtype))
        self.pool_r.index_put_((layer, self.write_slots), k_rope.to(self.pool_r.dtype))
        context_c, context_r = self.pool_c[layer_idx][self.gather], self.pool_r[layer_idx][self.gather]
        return context_c.to(c_kv.dtype), context_r.to(k_rope.dtype)

    def advance(self, num_tokens: int) -> None:
        """Lengths live in the engine's sequences."""


def decode_step(model: Transformer, ids: torch.Tensor, positions: torch.Tensor, pool_c: torch.Tensor,
                pool_r: torch.Tensor, gather: torch.Tensor, write_slots: torch.Tensor):
    """ids/positions/write_slots [B, T], gather [B, S] -> (logits [B, T, V] at every new token, final-normed
    hidden [B, T, D]) (absorbed MLA; the hidden feeds an MTP drafter). T > 1: a token and its drafts.

    B * T is at most COMPILED_DECODE_MAX_TOKENS. The implementations are the ones inductor fuses: the experts'
    host-sync-free `decode` path and the `compiled` kernels (model/layers.py: one row on CPU as a product
    and a sum, int8 weights likewise); run eagerly (the tests' reference) they give the same numbers."""
    view = DecodeView(pool_c, pool_r, gather, write_slots)
    return model(ids, positions, cache=view, attn_impl="absorbed", moe_impl="decode", kernel_impl="compiled",
                 return_hidden=True)


def draft_step(model: Transformer, hidden: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor,
               pool_c: torch.Tensor, pool_r: torch.Tensor, gather: torch.Tensor, write_slots: torch.Tensor,
               last: torch.Tensor, depth: int = 0):
    """MTP module `depth` drafting over the pool: hidden [B, T, D], next_ids/positions/write_slots [B, T],
    gather [B, S], last [B] -> (draft logits at each row's `last` position [B, V], block output there [B, D])."""
    view = DecodeView(pool_c, pool_r, gather, write_slots)
    logits, h = model.draft(hidden, next_ids, positions, view, depth, last, "absorbed", "decode", "compiled")
    return logits, h[torch.arange(h.shape[0], device=h.device), last]


class CompiledStep:
    """One step function of one model (decode_step, or draft_step at one depth), compiled.

    One row (the latency case) runs through AOTInductor packages on CPU, one per number of new tokens: the
    same inductor kernels as torch.compile's, called from C++ without dynamo's Python wrapper and guards
    around them (~0.35-0.45 ms less per step on the demo model). A package holds no weights: it reads the
    model's own tensors (user-managed constants), so in-place weight updates, as GRPO's, are seen. Several
    rows (and one row on other devices, or if export fails) run through torch.compile. Arguments are
    tensors, the pools (dim 1: slots) and the gather index (dim 1: context) at `pools` and `gather_arg`.
    """

    def __init__(self, model: Transformer, step, pools: tuple[int, int], gather_arg: int, **static):
        self.model, self.step, self.static = model, step, static
        self.pools, self.gather_arg = pools, gather_arg
        self._multi = _private_compile(step)
        self._packages: dict[tuple, object] = {}  # shape of the first argument -> loaded package, or False
        self._package_dir: tempfile.TemporaryDirectory | None = None

    def __call__(self, *args):
        first = args[0]
        if first.shape[0] == 1 and first.device.type == "cpu":
            key = tuple(first.shape)
            if key not in self._packages:
                self._packages[key] = self._export(args)
            package = self._packages[key]
            if package is not False:
                # the package's loader directly: its Python __call__ re-parses the call spec and flattens
                # the arguments on every call (~50 us a step)
                return tuple(package.loader.boxed_run(list(args)))
        return self._multi(self.model, *args, **self.static)

    def _export(self, example):
        """AOTInductor package of the one-row step at this width (context length and pool size dynamic);
        False if the model does not export (then torch.compile serves one row too)."""
        try:
            with warnings.catch_warnings():  # torch's own export/packaging trips its LeafSpec deprecation
                warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
                return self._build_package(example)
        except Exception as e:  # export covers what torch.compile does; if not, that path still works
            warnings.warn(f"one-row step not exported ({type(e).__name__}: {str(e)[:200]}); using torch.compile",
                          stacklevel=2)
            return False

    def _build_package(self, example):
        module = _Step(self.model, self.step, self.static)
        context, slots = torch.export.Dim("context", min=2), torch.export.Dim("slots")
        shapes = [None] * len(example)
        shapes[self.pools[0]] = shapes[self.pools[1]] = {1: slots}
        shapes[self.gather_arg] = {1: context}
        program = torch.export.export(module, tuple(example), dynamic_shapes={"args": tuple(shapes)}, strict=False)
        if self._package_dir is None:
            self._package_dir = tempfile.TemporaryDirectory(prefix="openr2-step-")
        name = f"{self.step.__name__}-{len(self._packages)}.pt2"
        path = torch._inductor.aoti_compile_and_package(
            program, package_path=os.path.join(self._package_dir.name, name),
            inductor_configs={"aot_inductor.package_constants_in_so": False})
        runner = torch._inductor.aoti_load_package(path)
        tensors = dict(module.named_parameters()) | dict(module.named_buffers())
        runner.load_constants({name: tensors[name] for name in runner.get_constant_fqns()},
                              check_full_update=True, user_managed=True)
        return runner

    @property
    def num_packages(self) -> int:
        return sum(1 for p in self._packages.values() if p is not False)


class _Step(torch.nn.Module):
    def __init__(self, model: Transformer, step, static: dict):
        super().__init__()
        self.model, self.step, self.static = model, step, static

    def forward(self, *args):
        return self.step(self.model, *args, **self.static)


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled_decode_step(model: Transformer) -> CompiledStep:
    """The compiled decode step of this model (engines on the same model share its graphs)."""
    return _compiled(model, "decode")


def compiled_draft_step(model: Transformer, depth: int) -> CompiledStep:
    """The compiled draft step of this model's MTP module `depth`."""
    return _compiled(model, f"draft-{depth}")


def _compiled(model: Transformer, name: str) -> CompiledStep:
    steps = _COMPILED.setdefault(model, {})
    if name not in steps:
        if name == "decode":
            steps[name] = CompiledStep(model, decode_step, pools=(2, 3), gather_arg=4)
        else:
            steps[name] = CompiledStep(model, draft_step, pools=(3, 4), gather_arg=5, depth=int(name.split("-")[1]))
    return steps[name]


def _private_compile(step):
    """`step` under torch.compile, for one model.

    The function gets a private copy of its code object, so its compiled graphs live in a cache of its own
    (torch.compile caches per code object). That makes it safe to skip the per-call guards on the model's
    modules (~370 us -> ~90 us per step on a 6-layer model): the weights are read at each call (in-place
    updates, as GRPO's, are seen), and no other model can ever reach these graphs. fullgraph: a graph break
    would put model code frames in the shared cache; the engine falls back to eager instead.
    """
    code = step.__code__.replace()
    private = types.FunctionType(code, step.__globals__, step.__name__, step.__defaults__)
    return torch.compile(private, dynamic=True, fullgraph=True,
                         options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
                                  "cpp_wrapper": True})
