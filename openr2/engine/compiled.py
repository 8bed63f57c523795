"""The compiled decode step (EngineConfig.compile): "B rows, T new tokens each" ahead of time.

At small batch a decode step is dispatch-bound: hundreds of small eager ops at a few microseconds each cost
more than the matmuls. Inductor fuses the elementwise work (norms, rope, softmax, routing) into a few C++
kernels and leaves the matmuls to MKL. Context length and pool size are dynamic, so a model compiles once
per shape class (one row or several; T tokens per row: one, or one and its drafts), not once per length,
and the compiled packages are kept on disk for the next start (CompiledStep).

The step reads and writes the engine's paged pool directly: `DecodeView` is the paged cache of a
decode-only step, built from plain tensors so that it can live inside the compiled region. Its reads go
through the block tables in place (engine/paged_attention.py's kernel, an opaque op to the compiler), so no
context is copied inside the graph. The MTP draft step (`draft_step`, speculative decoding) is compiled the
same way. DeepSeek-V3.2 (sparse attention) passes its indexer keys too: the indexer's in-place scan
(paged_attention.py) is one more opaque op, its top-k and the selected latents' gather are traced.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import types
import warnings
import weakref

import torch

from openr2.engine import aoti, paged_attention
from openr2.model.transformer import Transformer

COMPILED_DECODE_MAX_TOKENS = 16  # the compiled decode step's largest batch (more rows run eager)
COMPILED_DECODE_MAX_WIDTH = 4  # tokens per row: one and up to three drafts

class DecodeView:
    """The cache of a decode-only step over rows padded to T new tokens: the valid tokens (flat index
    `write_index` into [B * T]) go to pool slots `write_slots`; row b reads keys 0..positions[b, t] through
    `block_table[b]` (blocks of `block_size` slots). read: "blocks" (in place) or "gather" (the reference:
    each row's context copied out first, as before the in-place read). pool_k: the indexer keys of a model
    with sparse attention (DeepSeek-V3.2), else None.

    With pool_k the indexer scores every key of the tables (those past a query are -inf) and always selects
    (`selects_always`: no host sync on the positions): a query that sees fewer than index_topk keys selects
    them all, which is dense MLA up to rounding."""

    selects_always = True

    def __init__(self, pool_c: torch.Tensor, pool_r: torch.Tensor, block_table: torch.Tensor,
                 write_slots: torch.Tensor, write_index: torch.Tensor, block_size: int, read: str = "blocks",
                 pool_k: torch.Tensor | None = None):
        self.pool_c, self.pool_r, self.block_table, self.pool_k = pool_c, pool_r, block_table, pool_k
        self.write_slots, self.write_index, self.block_size, self.read_impl = write_slots, write_index, block_size, read

    def _write(self, pool: torch.Tensor, layer_idx: int, new: torch.Tensor) -> None:
        # Written into the whole pool tensor, not into a per-layer view of it: compiled, a write through a
        # view becomes a copy of the entire pool per layer (~70 ms/step at 64 MB), this one a scatter.
        layer = torch.full_like(self.write_slots, layer_idx)
        pool.index_put_((layer, self.write_slots), new.flatten(0, 1)[self.write_index].to(pool.dtype))

    def write(self, layer_idx: int, c_kv: torch.Tensor, k_rope: torch.Tensor) -> None:
        self._write(self.pool_c, layer_idx, c_kv)
        self._write(self.pool_r, layer_idx, k_rope)

    def write_indexer(self, layer_idx: int, k_index: torch.Tensor) -> None:
        if self.pool_k is None:
            raise ValueError("this decode step was given no indexer keys (its model has no indexer)")
        self._write(self.pool_k, layer_idx, k_index)

    def read(self, layer_idx: int):
        raise NotImplementedError("the compiled decode step runs absorbed attention only")

    def _num_keys(self) -> int:
        return self.block_table.shape[1] * self.block_size

    def attend(self, layer_idx: int, q_latent: torch.Tensor, q_rope: torch.Tensor, positions: torch.Tensor,
               scale: float) -> torch.Tensor:
        args = (q_latent, q_rope, self.pool_c, self.pool_r, layer_idx, self.block_table, positions,
                self.block_size, scale)
        if self.read_impl == "blocks" and paged_attention.kernel_reads(self.pool_c):
            return paged_attention.paged_latent_attention(*args)
        # every key of the tables (the mask hides those past each query): no size that depends on data
        slots = paged_attention.block_slots(self.block_table, self.block_size, self._num_keys())
        return paged_attention.gather_latent_attention(*args, slots=slots)

    def index_scores(self, layer_idx: int, q_index: torch.Tensor, weights: torch.Tensor, positions: torch.Tensor,
                     scale: float) -> torch.Tensor:
        """[B, T, S] for S = every key of the tables, -inf past each query."""
        S = self._num_keys()
        if self.pool_k.dtype == torch.bfloat16:  # a bf16 model's keys, or the opt-in bf16 scan: bf16 queries
            q_index = q_index.to(torch.bfloat16)
        args = (q_index, weights, self.pool_k, layer_idx, self.block_table, positions, S, self.block_size, scale)
        if self.read_impl == "blocks" and paged_attention.index_kernel_reads(self.pool_k, q_index.dtype):
            return paged_attention.paged_index_scores(*args)
        slots = paged_attention.block_slots(self.block_table, self.block_size, S)
        return paged_attention.gather_index_scores(*args, slots=slots)

    def attend_sparse(self, layer_idx: int, q_latent: torch.Tensor, q_rope: torch.Tensor, positions: torch.Tensor,
                      indices: torch.Tensor, scale: float) -> torch.Tensor:
        # keys past the query (some past the tables: a query seeing fewer keys than it selects) are masked;
        # their slots are read as the query's own key's (no clamp to the tables' width: a scalar of the
        # dynamic width would make export specialise it)
        visible = indices <= positions[:, :, None]
        safe = torch.where(visible, indices, positions[:, :, None])
        slots = paged_attention.key_slots(self.block_table, self.block_size, safe)
        return paged_attention.gather_sparse_attention(q_latent, q_rope, self.pool_c[layer_idx],
                                                       self.pool_r[layer_idx], slots, visible, scale, None)

    def advance(self, num_tokens: int) -> None:
        """Lengths live in the engine's sequences."""


def decode_step(model: Transformer, ids: torch.Tensor, positions: torch.Tensor, pool_c: torch.Tensor,
                pool_r: torch.Tensor, block_table: torch.Tensor, write_slots: torch.Tensor,
                write_index: torch.Tensor, block_size: int, read: str = "blocks", pool_k: torch.Tensor | None = None):
    """ids/positions [B, T], block_table [B, W], write_slots/write_index [number of valid new tokens] (as
    PagedView.decode_args gives them; pool_k: the indexer keys, PagedView.index_args) -> (logits of every new position [B, T, V], final-normed hidden
    [B, T, D]) (absorbed MLA; the hidden feeds an MTP drafter). T > 1: a token and its drafts.

    B * T is at most COMPILED_DECODE_MAX_TOKENS. The implementations are the ones inductor fuses: the experts'
    host-sync-free `decode` path and the `compiled` kernels (model/layers.py: one row on CPU as a product
    and a sum, int8 weights likewise); run eagerly (the tests' reference) they give the same numbers."""
    view = DecodeView(pool_c, pool_r, block_table, write_slots, write_index, block_size, read, pool_k)
    return model(ids, positions, cache=view, attn_impl="absorbed", moe_impl="decode", kernel_impl="compiled",
                 return_hidden=True)


def draft_step(model: Transformer, hidden: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor,
               pool_c: torch.Tensor, pool_r: torch.Tensor, block_table: torch.Tensor, write_slots: torch.Tensor,
               write_index: torch.Tensor, last: torch.Tensor, block_size: int, depth: int = 0, read: str = "blocks",
               pool_k: torch.Tensor | None = None):
    """MTP module `depth` drafting over the pool: hidden [B, T, D], next_ids/positions [B, T], the cache
    arguments as decode_step's, last [B] -> (draft logits at each row's `last` position [B, V], block output
    there [B, D]) (Transformer.draft_at: keys at every position, the block at `last` only)."""
    view = DecodeView(pool_c, pool_r, block_table, write_slots, write_index, block_size, read, pool_k)
    return model.draft_at(hidden, next_ids, positions, view, last, depth, "decode", "compiled")


def decode_draft_step(model: Transformer, ids: torch.Tensor, positions: torch.Tensor, pool_c: torch.Tensor,
                      pool_r: torch.Tensor, block_table: torch.Tensor, write_slots: torch.Tensor,
                      write_index: torch.Tensor, block_size: int, read: str = "blocks",
                      pool_k: torch.Tensor | None = None):
    """decode_step and the first MTP draft step in one call (speculative decoding with an MTP module).

    Row b's T tokens are a token and its drafts ids[b, 1:]. Greedy verification is done here too: the argmax
    next token of each position, and `accepted`, how many leading drafts equal the argmax before them. The
    MTP module then runs over the same positions fed each position's argmax next token (its keys at every
    position, its block at the last committed one, position `accepted`: Transformer.draft_at). For a greedy
    row that is exactly what a separate draft step would compute after sampling: the accepted drafts, then
    the correction at the first rejection (or the token after the last draft) are the argmax tokens. The
    engine redoes the draft step only for rows whose committed tokens are not the argmax ones (sampled
    rows). Returns (logits [B, T, V], final-normed hidden [B, T, D], argmax next tokens [B, T], accepted
    [B], the MTP's argmax draft at position accepted [B], its block output there [B, D])."""
    view = DecodeView(pool_c, pool_r, block_table, write_slots, write_index, block_size, read, pool_k)
    logits, hidden = model(ids, positions, cache=view, attn_impl="absorbed", moe_impl="decode",
                           kernel_impl="compiled", return_hidden=True)
    next_ids = logits.argmax(-1)
    accepted = greedy_accepted(ids, next_ids)
    draft_logits, h = model.draft_at(hidden, next_ids, positions, view, accepted, 0, "decode", "compiled")
    return logits, hidden, next_ids, accepted, draft_logits.argmax(-1), h


def greedy_accepted(ids: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
    """ids [B, T] (a token and its T - 1 drafts), next_ids [B, T] (the argmax after each) -> [B] how many
    leading drafts equal the argmax token before them (greedy verification)."""
    B, T = ids.shape
    if T == 1:
        return torch.zeros(B, dtype=torch.long, device=ids.device)
    wrong = ids[:, 1:] != next_ids[:, :-1]  # [B, T - 1]
    # the first wrong draft (argmax picks the first maximum), or all T - 1 when none is wrong
    return torch.where(wrong.any(1), wrong.int().argmax(1), T - 1)


class CompiledStep:
    """One step function of one model (decode_step, or draft_step at one depth), compiled ahead of time.

    Every shape class (rows, new tokens per row, block size) runs through an AOTInductor package on CPU:
    inductor's kernels called from C++ without dynamo's Python wrapper and guards (~0.35-0.45 ms less per step
    on the demo model than torch.compile). One row has packages of its own (the latency case); several rows
    share a few, each valid for the range of rows export proves (engine/aoti.py). Context length and pool
    size are dynamic. A package holds no weights: it reads the model's own tensors (user-managed constants),
    so in-place weight updates, as GRPO's, are seen. Packages are kept on disk (`cache_dir`), keyed by
    everything they depend on and checksummed: a restart loads each in tens of milliseconds instead of
    compiling it for ~30-60 s. Shapes that do not export run through torch.compile (dynamic rows and context;
    compiled once per process). Arguments are tensors; the pools (dim 1: slots) and the block table (dim 1:
    blocks) are at `pools` and `table_arg`, the write slots and indices right after it; block_size is a
    keyword. A model with sparse attention (V3.2) passes its indexer keys last, at `index_arg` (one of `pools`),
    which the step takes as its keyword pool_k.
    """

    def __init__(self, model: Transformer, step, pools: tuple[int, ...], table_arg: int,
                 cache_dir: str | None = None, index_arg: int | None = None, **static):
        paged_attention.load()  # the in-place read's kernel, registered before anything is traced
        self.model, self.step, self.static = model, step, static
        self.pools, self.table_arg, self.index_arg = pools, table_arg, index_arg
        self.cache_dir = cache_dir or default_cache_dir()
        self._multi = None  # torch.compile fallback, made on first need
        self._runners: dict[tuple, object] = {}  # (rows, width, block size) -> package loader, or False
        self._packages: dict[tuple, list[aoti.Package]] = {}  # (width, block size) -> the packages in use
        self.num_loaded = self.num_built = 0  # packages read from disk / compiled by this process

    def __call__(self, *args, block_size: int):
        rows, width = args[0].shape[:2]
        runner = self._runners.get((rows, width, block_size))
        if runner is None:
            runner = self._runners[rows, width, block_size] = self._package(rows, width, block_size, args).loader
        if runner is not False:
            # the package's loader directly: its Python __call__ re-parses the call spec and flattens the
            # arguments on every call (~50 us a step)
            return tuple(runner.boxed_run(list(args)))
        if self._multi is None:
            self._multi = _private_compile(self.step)
        args, index = _split_index(args, self.index_arg)
        return self._multi(self.model, *args, block_size=block_size, **index, **self.static)

    @property
    def num_packages(self) -> int:
        return sum(1 for ps in self._packages.values() for p in ps if p.loader is not False)

    def covers(self, rows: int, width: int, block_size: int) -> bool:
        """Whether this shape runs without compiling now (its package is loaded, or torch.compile serves it)."""
        return any(p.covers(rows) for p in self._packages.get((width, block_size), ()))

    def _package(self, rows: int, width: int, block_size: int, example) -> aoti.Package:
        """The package serving this shape: in use already, from disk, or compiled now; one without a loader if
        the model does not export (then torch.compile serves it)."""
        packages = self._packages.setdefault((width, block_size), [])
        for package in packages:
            if package.covers(rows):
                return package
        key = self._key(rows > 1, width, block_size, example)
        prefix = f"{self.step.__name__}-{aoti.key_hash(key)}"
        module = _Step(self.model, self.step, dict(self.static, block_size=block_size), self.index_arg)
        constants = dict(module.named_parameters()) | dict(module.named_buffers())
        package = aoti.find(self.cache_dir, prefix, key, rows, constants)
        if package is not None:
            self.num_loaded += 1
        else:
            try:
                package = aoti.build(self.cache_dir, prefix, key, module, tuple(example), self.pools, self.table_arg,
                                     width, constants)
                self.num_built += 1
            except Exception as e:  # export covers what torch.compile does; if not, that path still works
                warnings.warn(f"{self.step.__name__} not exported ({type(e).__name__}: {str(e)[:300]}); "
                              "using torch.compile", stacklevel=3)
                package = aoti.Package(1, 1, None) if rows == 1 else aoti.Package(2, math.inf, None)
        packages.append(package)
        return package

    def _key(self, several_rows: bool, width: int, block_size: int, example) -> dict:
        """Everything a package depends on, as strings (its manifest keeps it; its file name hashes it)."""
        params = [f"{n}:{tuple(t.shape)}:{t.dtype}" for n, t in self.model.state_dict(keep_vars=True).items()]
        config = json.dumps(self.model.config.to_hf(), sort_keys=True, default=str)
        return {"step": self.step.__name__, "static": repr(self.static), "width": width, "block_size": block_size,
                "rows": "several" if several_rows else "one",
                "inputs": [f"{a.dtype}:{a.device.type}:{a.dim()}" for a in example],
                "torch": torch.__version__, "cpu": torch.backends.cpu.get_cpu_capability(),
                "config": hashlib.sha256(config.encode()).hexdigest(),
                "parameters": hashlib.sha256("\n".join(params).encode()).hexdigest(), "code": _code_hash()}


def default_cache_dir() -> str:
    """Where compiled steps are kept: $OPENR2_CACHE_DIR/compiled, else ~/.cache/openr2/compiled."""
    root = os.environ.get("OPENR2_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "openr2")
    return os.path.join(root, "compiled")


@functools.cache
def _code_hash() -> str:
    """openr2's code that a compiled step contains (the model, quantized layers, this file)."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha256()
    for folder in ("model", "quant", "engine"):
        for name in sorted(os.listdir(os.path.join(package, folder))):
            if name.endswith(".py") and (folder != "engine" or name in ("aoti.py", "compiled.py", "paged_attention.py")):
                with open(os.path.join(package, folder, name), "rb") as f:
                    h.update(name.encode() + f.read())
    return h.hexdigest()


def _split_index(args: tuple, index_arg: int | None) -> tuple[tuple, dict]:
    """(the step's positional arguments, {"pool_k": the indexer keys} or {})."""
    if index_arg is None:
        return args, {}
    return args[:index_arg] + args[index_arg + 1 :], {"pool_k": args[index_arg]}


class _Step(torch.nn.Module):
    def __init__(self, model: Transformer, step, static: dict, index_arg: int | None = None):
        super().__init__()
        self.model, self.step, self.static, self.index_arg = model, step, static, index_arg

    def forward(self, *args):
        args, index = _split_index(args, self.index_arg)
        return self.step(self.model, *args, **index, **self.static)


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled_decode_step(model: Transformer, cache_dir: str | None = None) -> CompiledStep:
    """The compiled decode step of this model (engines on the same model share its packages)."""
    return _compiled(model, "decode", cache_dir)


def compiled_decode_draft_step(model: Transformer, cache_dir: str | None = None) -> CompiledStep:
    """The compiled decode step fused with the first MTP draft step (decode_draft_step)."""
    return _compiled(model, "decode-draft", cache_dir)


def compiled_draft_step(model: Transformer, depth: int, cache_dir: str | None = None) -> CompiledStep:
    """The compiled draft step of this model's MTP module `depth`."""
    return _compiled(model, f"draft-{depth}", cache_dir)


def _compiled(model: Transformer, name: str, cache_dir: str | None) -> CompiledStep:
    steps = _COMPILED.setdefault(model, {})
    sparse = model.config.has_indexer  # the indexer keys follow the step's other arguments
    if name not in steps:
        if name in ("decode", "decode-draft"):
            steps[name] = CompiledStep(model, decode_step if name == "decode" else decode_draft_step,
                                       (2, 3, 7) if sparse else (2, 3), 4, cache_dir, 7 if sparse else None)
        else:
            steps[name] = CompiledStep(model, draft_step, (3, 4, 9) if sparse else (3, 4), 5, cache_dir,
                                       9 if sparse else None, depth=int(name.split("-")[1]))
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
    private.__kwdefaults__ = step.__kwdefaults__
    return torch.compile(private, dynamic=True, fullgraph=True,
                         options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe,
                                  "cpp_wrapper": True})
