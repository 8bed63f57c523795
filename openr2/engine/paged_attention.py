"""Absorbed-MLA attention read in place from the paged latent pool, and the gather reference it replaces.

`paged_latent_attention` is the cache protocol's `attend` (openr2/model/mla.py) over a paged pool: for each
row, the queries of its new tokens against keys 0..p (p: the query's absolute position), the keys read where
they lie, through the row's block table. `gather_latent_attention` is the reference: gather each row's whole
context into a dense [B, S, C] tensor and run model/mla.py's `attend_latent`; the tests hold the two equal.

Why a C++ kernel (paged_attention.cpp, built on first use with torch.utils.cpp_extension and cached on disk):
the candidates, timed side by side by bench/paged_attention.py on this project's 2-vCPU Intel Xeon (Sapphire
Rapids, AVX-512; 2 threads, a shared machine: the other jobs took ~70% of it during this run, so read the
ratios), one layer of small_moe (H 8, C 64, R 16, float32), one row, one new token, blocks of 64 in shuffled
pool order, ms per call:

    context                              4K      16K     64K     128K
    gather + bmm (before; the reference) 1.27    7.53    32.0    77.2
      its copy alone                     0.27    1.21    10.6    40.9
    inductor, indirect loads fused       0.90    11.8    43.4    108.9
    views of contiguous blocks + mm      0.77    1.60    10.6    21.9   (only if a row's blocks are contiguous)
    this kernel                          0.20    0.79    6.2     16.0   (13.2 with contiguous blocks)

Inductor cannot fuse the gather into the matmuls: written as reductions over indirect loads, it re-reads the
context once per query row, slower than the copy. Views + MKL are fast but exist only for contiguous runs of a
row's blocks: with prefix sharing and a long-lived pool a row's blocks scatter, and a Python loop over rows
and runs cannot live in the compiled decode graph. Two other kernel forms were measured while writing this
one and dropped: one dot product per (query, key) with a horizontal sum (1.5-2x slower), and MKL/oneDNN
small GEMMs per run of blocks through ATen's brgemm (1.4-1.7x slower: call overhead at these sizes). The
kernel reads every key once, in place, whatever the block order, runs in eager steps and inside both
compiled decode paths (torch.compile and the AOTInductor package call it as an opaque op;
`torch.library.register_fake` gives its shape), and parallelises one long row over chunks of blocks
(flash-decoding: partial softmax per chunk, combined by log-sum-exp), so its step time grows with the bytes
a step attends and nothing else. It is compute-bound at ~6 GB/s of cache per thread (~50 ns per key of
80 floats for 8 query rows; the broadcast-FMA score loop is most of it), a quarter of what one thread can
stream here: a register-blocked dot-product micro-kernel with AVX-512 reductions is the next step if that
matters. It is the model's `attend` for float32 pools on CPU; other dtypes and devices (and machines where
the kernel cannot be built) read through the gather reference.

`paged_index_scores` is DeepSeek-V3.2's lightning-indexer scan over the paged indexer keys, in the same
extension: keys read in place through the block table, and per key the products of all indexer heads, ReLU,
head weight and head sum fused in registers, so neither a gathered copy of the keys (64 MB per layer at
128K tokens) nor the [Hi, S] products are ever written; `gather_index_scores` (model/indexer.py's products
over the gathered keys) is its reference. In float32 it is compute-bound (Hi Di FMAs per 4 Di bytes of key).
Opt-in, a bfloat16 indexer-key pool (as DeepSeek's kernels score in low precision: FP8 there) is scanned with
AMX tiles (16 keys x 16 heads x 32 dims per instruction, bf16 products exact, float32 sums), the queries
rounded to bf16 too; its reference is the same gather with bf16-rounded queries (bench/longctx.py times both).
The sparse read of the selected latents stays a gather of K rows (kv_cache.py says why).

Not here: bfloat16 latent pools (the latent kernel's loads would convert) and a CUDA kernel (FlashMLA-style).

Shape legend: B rows, T new tokens per row (padded), H heads, C kv_lora_rank, R rope dim, L cached layers,
N pool slots, W blocks per row's table, S context keys.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import threading
import time
import warnings

import torch

from openr2.model.mla import attend_latent, causal_mask

_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "paged_attention.cpp")
_ISA_FLAGS = {
    "AVX512": ["-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma"],
    "AVX2": ["-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma"],
}
_STALE_LOCK_S = 600.0  # an extension build's lock file older than this was left by a killed build
_lock = threading.Lock()
_loaded: bool | None = None  # None: not tried yet


def load() -> bool:
    """Build (first time on this machine, ~30 s; then loaded from its folder in ~0.015 s) and load
    the kernel; False, with a warning, where it cannot be built (no C++ compiler or ninja): readers then use
    the gather reference."""
    global _loaded
    with _lock:
        if _loaded is None:
            try:
                _build()
                _loaded = True
            except Exception as e:  # a build fails in many exception types; the reference path still works
                warnings.warn(f"paged attention kernel unavailable ({type(e).__name__}: {str(e)[:300]}); "
                              "reading the paged cache through the gather path", stacklevel=2)
                _loaded = False
    return _loaded


def _build() -> None:
    if hasattr(torch.ops.openr2, "paged_latent_attention"):  # loaded by another copy of this module
        return
    # at::parallel_for is OpenMP inline code (without -fopenmp, one thread); at::vec's vector width follows
    # the CPU_CAPABILITY macro: the one ATen picked for its own kernels on this CPU (others: portable code)
    flags = ["-O3", "-fopenmp"] + _ISA_FLAGS.get(torch.backends.cpu.get_cpu_capability(), [])
    with open(_SOURCE, "rb") as f:
        source = f.read()
    # Built in a folder named by what the library depends on, from a copy of the source kept there: torch
    # rebuilds an extension whenever its source path or flags change, so two checkouts (or venvs) sharing
    # one torch_extensions folder would otherwise rebuild it (~30 s) each time the other one had loaded it.
    # Once built, the library is loaded directly (no cpp_extension import and ninja check: ~0.1-0.3 s a start).
    key = hashlib.sha256(b"\0".join([source, " ".join(flags).encode(), torch.__version__.encode(),
                                      sys.version.encode()])).hexdigest()[:16]
    name = f"openr2_paged_attention_{key}"
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "torch_extensions")
    folder = os.path.join(root, name)
    try:
        torch.ops.load_library(os.path.join(folder, f"{name}.so"))
    except OSError:  # not built yet (or an interrupted build): build it
        from torch.utils import cpp_extension

        os.makedirs(folder, exist_ok=True)
        clear_stale_lock(folder)
        copy = os.path.join(folder, "paged_attention.cpp")
        if not os.path.isfile(copy):  # written once (a fresh mtime would make ninja rebuild), whole, then renamed
            with tempfile.NamedTemporaryFile(dir=folder, delete=False) as f:
                f.write(source)
            os.replace(f.name, copy)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cpp_extension.load(name, [copy], extra_cflags=flags, extra_ldflags=["-fopenmp"], build_directory=folder,
                               is_python_module=False, verbose=False)

    @torch.library.register_fake("openr2::paged_latent_attention")
    def _(q_latent, q_rope, pool_c, pool_r, layer, block_table, positions, block_size, scale):
        return q_latent.new_empty(q_latent.shape)  # contiguous, as the kernel returns it

    @torch.library.register_fake("openr2::paged_index_scores")
    def _(q_index, weights, pool_k, layer, block_table, positions, num_keys, block_size, scale):
        return q_index.new_empty((q_index.shape[0], q_index.shape[1], num_keys), dtype=torch.float32)


def clear_stale_lock(folder: str, stale_s: float = _STALE_LOCK_S) -> bool:
    """Remove the build folder's lock file if it is older than `stale_s`: cpp_extension's build takes it and
    waits, without limit, while it exists, so a build killed half-way (its lock left behind) would hang every
    later load. A build here takes ~20-120 s; a lock older than stale_s is nobody's. True if removed."""
    lock = os.path.join(folder, "lock")
    try:
        if time.time() - os.path.getmtime(lock) > stale_s:
            os.remove(lock)
            return True
    except OSError:  # no lock (the usual case), or another process removed it first
        pass
    return False


def kernel_reads(pool: torch.Tensor) -> bool:
    """Whether the kernel reads this pool (float32 on CPU, kernel built); otherwise the gather path does.
    (Once loaded, a plain read of `_loaded`: this runs inside traced decode steps, where a lock cannot.)"""
    if pool.device.type != "cpu" or pool.dtype != torch.float32:
        return False
    return _loaded if _loaded is not None else load()


def index_kernel_reads(pool_k: torch.Tensor, q_dtype: torch.dtype = torch.float32) -> bool:
    """Whether `paged_index_scores` scores queries of q_dtype over this indexer-key pool as the reference would:
    float32 keys; or bfloat16 keys and bfloat16 queries (a bf16 model's, or rounded by the opt-in bf16 scan:
    AMX where the CPU has it and D % 32 == block_size % 16 == 0, see `index_scan_amx`), on CPU. (The kernel
    rounds float32 queries over bf16 keys, which the float32 reference does not.)"""
    if pool_k.device.type != "cpu" or not (pool_k.dtype == torch.float32 or q_dtype == pool_k.dtype == torch.bfloat16):
        return False
    return _loaded if _loaded is not None else load()


def index_scan_amx(index_dim: int, block_size: int) -> bool:
    """Whether a bfloat16 indexer-key pool of this key width and block size is scanned with AMX tiles here
    (otherwise its keys are widened to float32 per block and scored by the float32 code: correct, slower)."""
    return load() and bool(torch.ops.openr2.paged_index_amx(index_dim, block_size))


def paged_latent_attention(q_latent: torch.Tensor, q_rope: torch.Tensor, pool_c: torch.Tensor,
                           pool_r: torch.Tensor, layer_idx: int, block_table: torch.Tensor,
                           positions: torch.Tensor, block_size: int, scale: float) -> torch.Tensor:
    """q_latent [B, T, H, C], q_rope [B, T, H, R] over pool_c [L, N, C] / pool_r [L, N, R] (layer layer_idx)
    through block_table [B, W]: query (b, t) sees keys 0..positions[b, t]. Returns [B, T, H, C].

    Table entries past a row's last needed block are never read (pad with any valid block id, e.g. 0)."""
    # contiguous queries (tiny): the kernel reads them so, and a compiled graph must not guess their strides
    return torch.ops.openr2.paged_latent_attention(q_latent.contiguous(), q_rope.contiguous(), pool_c, pool_r,
                                                   layer_idx, block_table, positions, block_size, scale)


def paged_index_scores(q_index: torch.Tensor, weights: torch.Tensor, pool_k: torch.Tensor, layer_idx: int,
                       block_table: torch.Tensor, positions: torch.Tensor, num_keys: int, block_size: int,
                       scale: float) -> torch.Tensor:
    """The lightning indexer's scores, read in place: q_index [B, T, Hi, Di], weights [B, T, Hi] over the indexer
    keys pool_k [L, N, Di] (layer layer_idx) through block_table [B, W] -> [B, T, num_keys] float32,
    sum_h weights ReLU(scale q . k) for keys 0..positions[b, t], -inf past it. ReLU, head weight and head sum
    are fused per key: neither the keys nor the [Hi, S] products are materialised.
    `gather_index_scores` is the reference."""
    return torch.ops.openr2.paged_index_scores(q_index.contiguous(), weights.contiguous(), pool_k, layer_idx,
                                               block_table, positions, num_keys, block_size, scale)


def gather_index_scores(q_index: torch.Tensor, weights: torch.Tensor, pool_k: torch.Tensor, layer_idx: int,
                        block_table: torch.Tensor, positions: torch.Tensor, num_keys: int, block_size: int,
                        scale: float, slots: torch.Tensor | None = None,
                        chunk_elements: int = 1 << 26) -> torch.Tensor:
    """The reference of `paged_index_scores` (same arguments): each row's keys gathered in position order, then
    model/indexer.py's `index_scores` products in its order (q . k per head, scale, ReLU, the weights' head
    sum), `chunk_elements` of the [B, t, Hi, S] products at a time. (The kernel scores a bfloat16 pool with the
    queries rounded to bf16: the reference of that is this function given the rounded queries.)"""
    if slots is None:
        slots = block_slots(block_table, block_size, num_keys)
    keys = pool_k[layer_idx].index_select(0, slots.flatten())
    kt = keys.view(*slots.shape, -1).float().transpose(1, 2).unsqueeze(1)  # [B, 1, Di, S]
    B, T, Hi, _ = q_index.shape
    step = max(1, chunk_elements // max(1, B * Hi * num_keys))
    out = []
    for t0 in range(0, T, step):  # in place: the [B, t, Hi, S] products are the step's largest tensor
        s = torch.matmul(q_index[:, t0 : t0 + step].float(), kt).mul_(scale).relu_()  # [B, t, Hi, S]
        out.append(torch.matmul(weights[:, t0 : t0 + step].unsqueeze(-2), s).squeeze(-2))  # [B, t, S]
    scores = out[0] if len(out) == 1 else torch.cat(out, dim=1)
    return scores.masked_fill_(~causal_mask(positions, num_keys), float("-inf"))


def gather_sparse_attention(q_latent: torch.Tensor, q_rope: torch.Tensor, pool_c: torch.Tensor,
                            pool_r: torch.Tensor, slots: torch.Tensor, visible: torch.Tensor, scale: float,
                            chunk_elements: int | None = 1 << 24) -> torch.Tensor:
    """Absorbed attention of query (b, t) over only its selected keys: q_latent [B, T, H, C], q_rope [B, T, H, R]
    over one layer's pool_c [N, C] / pool_r [N, R] at slots [B, T, K], visible [B, T, K] -> [B, T, H, C]. The K
    rows are gathered by slot, `chunk_elements` gathered elements at a time (None: every query at once, as a
    compiled step, whose rows are dynamic, must), for MKL's products (model/mla.py's
    `attend_latent_sparse` is the reference). Why not read them in place: the paged kernel over one-token
    blocks was measured at 9.0-9.7 ms against 7.3-7.7 ms for this (V3.2 shapes, K 2048, 128 heads, one query,
    2 shared vCPUs, load 4.8), of which the copy is 0.45 ms."""
    B, T, H, C = q_latent.shape
    K, R = slots.shape[-1], q_rope.shape[-1]
    step = T if chunk_elements is None else max(1, chunk_elements // max(1, B * K * (C + R)))
    out = []
    for t0 in range(0, T, step):
        sl = slots[:, t0 : t0 + step]
        t = sl.shape[1]
        flat = sl.reshape(-1)
        c_sel = pool_c.index_select(0, flat).view(B * t, K, C).to(q_latent.dtype)  # [B t, K, C]
        r_sel = pool_r.index_select(0, flat).view(B * t, K, R).to(q_rope.dtype)
        scores = torch.bmm(q_latent[:, t0 : t0 + step].reshape(B * t, H, C), c_sel.transpose(1, 2))
        scores = torch.baddbmm(scores, q_rope[:, t0 : t0 + step].reshape(B * t, H, R), r_sel.transpose(1, 2),
                               alpha=scale, beta=scale)  # [B t, H, K]
        scores = scores.masked_fill(~visible[:, t0 : t0 + step].reshape(B * t, 1, K), float("-inf"))
        probs = scores.softmax(dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(c_sel.dtype)
        out.append(torch.bmm(probs, c_sel).view(B, t, H, C))
    return out[0] if len(out) == 1 else torch.cat(out, dim=1)


def key_slots(block_table: torch.Tensor, block_size: int, indices: torch.Tensor) -> torch.Tensor:
    """Pool slots [B, T, K] of key positions indices [B, T, K] through each row's block table [B, W]."""
    B, T, K = indices.shape
    flat = indices.reshape(B, T * K)
    return (block_table.gather(1, flat // block_size) * block_size + flat % block_size).view(B, T, K)


def block_slots(block_table: torch.Tensor, block_size: int, num_keys: int) -> torch.Tensor:
    """[B, num_keys] pool slot of each row's key j (through its block table; padding blocks past the end)."""
    offsets = torch.arange(block_size, device=block_table.device)
    return (block_table[:, :, None] * block_size + offsets).flatten(1)[:, :num_keys]


def gather_latent_attention(q_latent: torch.Tensor, q_rope: torch.Tensor, pool_c: torch.Tensor,
                            pool_r: torch.Tensor, layer_idx: int, block_table: torch.Tensor,
                            positions: torch.Tensor, block_size: int, scale: float,
                            slots: torch.Tensor | None = None) -> torch.Tensor:
    """The reference of `paged_latent_attention` (same arguments): gather each row's context, keys 0..S-1 for
    S = the largest position + 1, then dense attention with the positional causal mask. `slots` (from
    `block_slots`) may be given when several layers share one gather index."""
    num_keys = slots.shape[1] if slots is not None else int(positions.max()) + 1
    if slots is None:
        slots = block_slots(block_table, block_size, num_keys)
    c_kv, k_rope = pool_c[layer_idx][slots], pool_r[layer_idx][slots]
    mask = causal_mask(positions, num_keys)
    return attend_latent(q_latent, q_rope, c_kv.to(q_latent.dtype), k_rope.to(q_rope.dtype), mask, scale)
