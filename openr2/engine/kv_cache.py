"""Paged KV cache: the tensor pool, the cache kind of each layer, and the per-forward view the model uses.

The pool is one memory budget cut into blocks of `block_size` tokens; a sequence's block table (the block
manager's business, prefix_cache.py) lists its blocks in position order, and the same block id indexes every
cached layer. What a layer stores for a block is its *cache kind*'s business:
- `LatentKind` (DeepSeek V2/V3 MLA): per token the normalised latent c_kv [C] and the rotated rope key
  k_rope [R]; for DeepSeek-V3.2 (sparse attention) also the lightning indexer's key k_index [Di] (128 dims in
  the release), in the same blocks at the same slots, so one block table, one prefix-cache hit and one
  copy-on-write cover latent and indexer key alike, and the memory budget counts both.
- DeepSeek-V4 is not MLA: its pool (window keys, compressed entries, indexer entries, compressor state per
  block, on the same block tables and budget rule) is engine/v4_cache.py's V4Pool, which the engine builds
  instead of this one.
A kind says how many entries a block holds and how wide each field is; `cache_kinds` maps a config's layers
to kinds (all latent, with the indexer key for V3.2); `KVPool.from_budget` sizes the blocks so
that the bytes of all layers' kinds for one block, times the number of blocks, fit the budget. Layers of one
kind share stacked tensors ([layers of that kind, entries, width]), so a compiled step writes and reads one
tensor per field.

`PagedView` implements the cache protocol of openr2.model.mla for one forward over a padded batch [B, T]:
`write` scatters the new tokens (row b's first num_new[b] of T) into their slots; `attend` (the absorbed
path: decode rows, short tails over long contexts) reads the pool in place through the block tables
(engine/paged_attention.py); `read` (the naive path, compute-bound prompt chunks that expand K/V from the
latent anyway) gathers each row's context into [B, S, .] in position order. The step's index tensors come
from the block tables and lengths by tensor ops, not per-token Python loops.

Sparse attention (V3.2; the protocol's `write_indexer`, `index_scores`, `attend_sparse`): `write_indexer`
scatters the indexer keys to the latents' slots; `index_scores` scores every context key of each row from the
indexer keys alone (Di floats per key, against C + R for a latent; the latents are not read), in place by block
table with the head sum fused (engine/paged_attention.py), or gathered [B, S, Di] in position order (read=
"gather", the reference); `attend_sparse` maps the selected key positions [B, T, K] to pool slots through the
block tables (tensor ops) and gathers only those K latents per query (index_select by slot, then
model/mla.py's `attend_latent_sparse` products): a decode step reads K latents, not the context's.

Shape legend: L layers, N slots (num_blocks * block_size), B rows, T new tokens per row (padded),
S context per row (padded), W blocks per block table, C kv_lora_rank, R rope dim, Di indexer head dim,
K keys selected per query.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from openr2.config import ModelConfig
from openr2.engine import paged_attention

_GATHER_CHUNK_ELEMENTS = 1 << 24  # gathered latent elements per chunk of queries (attend_sparse)
_SCORE_CHUNK_ELEMENTS = 1 << 26  # indexer products [B, t, Hi, S] per chunk of queries (index_scores)

READ_IMPLS = ("blocks", "gather")  # the absorbed read: in place through the block tables, or the gather reference


@dataclass(frozen=True)
class LatentKind:
    """MLA's latent cache: per token and layer c_kv [kv_lora_rank] and k_rope [rope_dim], one entry per token;
    with index_dim (DeepSeek-V3.2) also the indexer key k_index [index_dim] beside them.

    A cache kind is this much: its fields and their widths, and how many tokens one entry covers; the pool
    allocates it, the layer's view reads it. A compressed kind (V4's CSA/HCA entries) has tokens_per_entry > 1.
    """

    kv_lora_rank: int
    rope_dim: int
    tokens_per_entry: int = 1
    index_dim: int = 0  # the lightning indexer's key (V3.2), 0: none
    index_dtype: torch.dtype | None = None  # the indexer key's dtype; None: the pool's (bfloat16: opt-in scan)

    @property
    def fields(self) -> dict[str, int]:
        fields = {"c_kv": self.kv_lora_rank, "k_rope": self.rope_dim}
        if self.index_dim:
            fields["k_index"] = self.index_dim
        return fields

    def entries_per_block(self, block_size: int) -> int:
        return -(-block_size // self.tokens_per_entry)

    def field_dtype(self, name: str, dtype: torch.dtype) -> torch.dtype:
        """The dtype field `name` is stored in, in a pool of `dtype`."""
        return self.index_dtype if name == "k_index" and self.index_dtype is not None else dtype

    def bytes_per_block(self, block_size: int, dtype: torch.dtype) -> int:
        return self.entries_per_block(block_size) * sum(
            width * self.field_dtype(name, dtype).itemsize for name, width in self.fields.items())


def cache_kinds(config: ModelConfig, num_layers: int | None = None,
                index_dtype: torch.dtype | None = None) -> list[LatentKind]:
    """The cache kind of each cached layer (decoder layers, then MTP layers): the latent cache for all, with
    the indexer key beside the latent for a model with DeepSeek Sparse Attention (V3.2: every attention layer,
    the MTP layers' included, has an indexer), in `index_dtype` (None: the pool's dtype)."""
    if index_dtype not in (None, torch.float32, torch.bfloat16):
        raise ValueError(f"index_dtype {index_dtype}: expected float32 or bfloat16 (or None: the pool's dtype)")
    indexed = config.has_indexer
    kind = LatentKind(config.kv_lora_rank, config.qk_rope_head_dim, index_dim=config.index_head_dim if indexed else 0,
                      index_dtype=index_dtype if indexed else None)
    return [kind] * (num_layers or config.num_hidden_layers)


def bytes_per_token(config: ModelConfig, dtype: torch.dtype, num_layers: int | None = None,
                    index_dtype: torch.dtype | None = None) -> int:
    """Cache bytes one token takes across all cached layers: L x (C + R [+ Di]) elements for the latent cache
    (and the indexer key, in index_dtype)."""
    return sum(kind.bytes_per_block(1, dtype) for kind in cache_kinds(config, num_layers, index_dtype))


class KVPool:
    """num_layers: cached layers, indexed by the attention's layer_idx; the decoder layers by default, plus
    the MTP layers (indices L..L+D-1) when the engine drafts with them. index_dtype: the indexer keys' dtype
    (V3.2; None: `dtype`); bfloat16 is the opt-in low-precision scan (engine/paged_attention.py: AMX tiles
    where the CPU has them), half the indexer key's bytes."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int = 64,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 num_layers: int | None = None, index_dtype: torch.dtype | None = None):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1 (got {num_blocks}); raise the cache memory budget")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.kinds = cache_kinds(config, num_layers, index_dtype)
        self.index_dtype = index_dtype if config.has_indexer else None
        # layers of one kind share stacked tensors: kind -> {field: [layers, entries, width]}, and each
        # layer's index in its kind's stack
        self.tensors: dict[LatentKind, dict[str, torch.Tensor]] = {}
        self.index_in_kind: list[int] = []
        for kind in dict.fromkeys(self.kinds):
            layers = [i for i, k in enumerate(self.kinds) if k == kind]
            entries = num_blocks * kind.entries_per_block(block_size)
            self.tensors[kind] = {name: torch.zeros(len(layers), entries, width, dtype=kind.field_dtype(name, dtype),
                                                    device=device) for name, width in kind.fields.items()}
        for i, kind in enumerate(self.kinds):
            self.index_in_kind.append(self.kinds[:i].count(kind))
        latent = self.tensors[self.kinds[0]]
        self.c_kv, self.k_rope = latent["c_kv"], latent["k_rope"]  # the latent cache of every layer (one kind)
        self.k_index = latent.get("k_index")  # [L, N, Di] the indexer keys (V3.2), or None
        paged_attention.kernel_reads(self.c_kv)  # the kernel that reads this pool: built now, not in a first step

    @classmethod
    def from_budget(cls, config: ModelConfig, budget_bytes: int, block_size: int = 64,
                    dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                    num_layers: int | None = None, index_dtype: torch.dtype | None = None) -> KVPool:
        """As many blocks as fit `budget_bytes`, a block costing what every cached layer's kind stores for it."""
        per_block = sum(kind.bytes_per_block(block_size, dtype) for kind in cache_kinds(config, num_layers, index_dtype))
        return cls(config, int(budget_bytes // per_block), block_size, dtype, device, num_layers, index_dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for fields in self.tensors.values() for t in fields.values())

    def copy_block(self, src: int, dst: int, num_tokens: int) -> None:
        """Copy the first num_tokens tokens of block src into block dst (copy-on-write for forked samples)."""
        for kind, fields in self.tensors.items():
            per_block = kind.entries_per_block(self.block_size)
            n = -(-num_tokens // kind.tokens_per_entry)
            s, d = src * per_block, dst * per_block
            for t in fields.values():
                t[:, d : d + n] = t[:, s : s + n]

    def _block_fields(self):
        """(name, [layers, num_blocks, entries per block, width] view of the pool) of every field."""
        for k, (kind, fields) in enumerate(self.tensors.items()):
            per = kind.entries_per_block(self.block_size)
            for name, t in fields.items():
                yield (name if len(self.tensors) == 1 else f"{k}.{name}"), t.view(t.shape[0], self.num_blocks, per, -1)

    def export_blocks(self, blocks: list[int]) -> dict[str, torch.Tensor]:
        """Copies of what the pool holds for `blocks` (the disk tier, engine/disk_cache.py): field -> [n, layers,
        entries per block, width]."""
        index = torch.tensor(blocks, dtype=torch.long, device=self.c_kv.device)
        return {name: t.index_select(1, index).movedim(1, 0).contiguous() for name, t in self._block_fields()}

    def import_blocks(self, blocks: list[int], tensors: dict[str, torch.Tensor]) -> None:
        """Write export_blocks' tensors (for other blocks, or another process's pool of this layout) into `blocks`."""
        index = torch.tensor(blocks, dtype=torch.long, device=self.c_kv.device)
        for name, t in self._block_fields():
            t.index_copy_(1, index, tensors[name].to(t.device, t.dtype).movedim(0, 1))

    def view(self, block_tables: list[list[int]], num_computed: list[int], num_new: list[int],
             read: str = "blocks") -> PagedView:
        """The cache for one forward: row b has num_computed[b] cached tokens and num_new[b] new ones.

        read: how the absorbed path reads the context, "blocks" (in place, engine/paged_attention.py) or
        "gather" (the reference: each row's context copied into a dense tensor first)."""
        return PagedView(self, block_tables, num_computed, num_new, read)

    def decode_args(self, block_tables: list[list[int]], num_computed: list[int], width: int) -> tuple:
        """`view(block_tables, num_computed, [width] * B).decode_args()` (the compiled steps' cache arguments)
        for rows of `width` new tokens each, built from Python lists: a compiled step has a few new tokens
        (at most COMPILED_DECODE_MAX_TOKENS), and a few list operations cost less than the view's dozen small
        tensor operations. The block tables must hold each row's new positions."""
        bs = self.block_size
        W = max(2, -(-(max(num_computed) + width) // bs))
        table, slots = [], []
        for blocks, start in zip(block_tables, num_computed):
            row = blocks[:W]
            table.append(row + [0] * (W - len(row)))
            slots += [row[p // bs] * bs + p % bs for p in range(start, start + width)]
        device = self.c_kv.device
        return (self.c_kv, self.k_rope, torch.tensor(table, device=device), torch.tensor(slots, device=device),
                torch.arange(len(slots), device=device), bs)

    def index_args(self) -> tuple:
        """The indexer keys, passed after the compiled steps' other arguments (a model with an indexer), or ()."""
        return () if self.k_index is None else (self.k_index,)


class PagedView:
    def __init__(self, pool: KVPool, block_tables: list[list[int]], num_computed: list[int], num_new: list[int],
                 read: str = "blocks"):
        if read not in READ_IMPLS:
            raise ValueError(f"read must be one of {READ_IMPLS}, got {read!r}")
        self.pool, self.read_impl = pool, read
        bs = pool.block_size
        device = pool.c_kv.device
        T = max(num_new)
        self.num_keys = max(done + new for done, new in zip(num_computed, num_new))
        # Block tables as one [B, W] tensor, cut to the blocks the step reads and padded with block 0 (never
        # read: the attention stops at each query's position); at least two columns, so that a compiled step
        # sees a width it keeps dynamic (export specialises a dimension of size 1).
        width = max(2, -(-self.num_keys // bs))
        table = torch.tensor([t[:width] + [0] * (width - len(t[:width])) for t in block_tables], dtype=torch.long)
        # The new tokens: row b's tokens 0..num_new[b]-1 (padding past them is never written) at positions
        # num_computed[b] + t; write_index is their flat index into [B, T], write_slots their pool slots.
        t = torch.arange(T)
        positions = torch.tensor(num_computed)[:, None] + t  # [B, T]
        valid = (t < torch.tensor(num_new)[:, None]).flatten()
        positions = positions.clamp_(max=width * bs - 1)  # padding past the table: any slot, never written
        slots = (table.gather(1, positions // bs) * bs + positions % bs).flatten()
        write_index = valid.nonzero().squeeze(1)
        self.write_index, self.write_slots = write_index.to(device), slots[write_index].to(device)
        self.block_table = table.to(device)
        self._slots: torch.Tensor | None = None  # the gather index, built on first need, shared by the layers

    def decode_args(self) -> tuple:
        """The cache arguments of the compiled decode step (engine/compiled.py: decode_step)."""
        return (self.pool.c_kv, self.pool.k_rope, self.block_table, self.write_slots, self.write_index,
                self.pool.block_size)

    def index_args(self) -> tuple:
        """The indexer keys, passed after the compiled step's other arguments (a model with an indexer), or ()."""
        return self.pool.index_args()

    def _layer(self, layer_idx: int) -> int:
        return self.pool.index_in_kind[layer_idx]

    def write(self, layer_idx: int, c_kv: torch.Tensor, k_rope: torch.Tensor) -> None:
        """Scatter the new tokens' c_kv [B, T, C] / k_rope [B, T, R] into their slots."""
        i = self._layer(layer_idx)
        pool_c, pool_r = self.pool.c_kv[i], self.pool.k_rope[i]
        pool_c.index_copy_(0, self.write_slots, c_kv.flatten(0, 1)[self.write_index].to(pool_c.dtype))
        pool_r.index_copy_(0, self.write_slots, k_rope.flatten(0, 1)[self.write_index].to(pool_r.dtype))

    def write_indexer(self, layer_idx: int, k_index: torch.Tensor) -> None:
        """Scatter the new tokens' indexer keys k_index [B, T, Di] into their slots (the latents' slots)."""
        if self.pool.k_index is None:
            raise ValueError("this pool holds no indexer keys (its config has no indexer)")
        pool_k = self.pool.k_index[self._layer(layer_idx)]
        pool_k.index_copy_(0, self.write_slots, k_index.flatten(0, 1)[self.write_index].to(pool_k.dtype))

    def index_scores(self, layer_idx: int, q_index: torch.Tensor, weights: torch.Tensor, positions: torch.Tensor,
                     scale: float) -> torch.Tensor:
        """[B, T, S] float32: the indexer's score of each row's context keys 0..S-1 (S = the longest context),
        -inf past each query's position. Reads the indexer keys only: in place by block table, ReLU and head
        sum fused (engine/paged_attention.py), or gathered in position order (read="gather", the reference)."""
        if self.pool.index_dtype == torch.bfloat16:  # the opt-in bf16 scan: queries rounded as the keys are
            q_index = q_index.to(torch.bfloat16)
        args = (q_index, weights, self.pool.k_index, self._layer(layer_idx), self.block_table, positions,
                self.num_keys, self.pool.block_size, scale)
        if self.read_impl == "blocks" and paged_attention.index_kernel_reads(self.pool.k_index, q_index.dtype):
            return paged_attention.paged_index_scores(*args)
        return paged_attention.gather_index_scores(*args, slots=self.slots(), chunk_elements=_SCORE_CHUNK_ELEMENTS)

    def attend_sparse(self, layer_idx: int, q_latent: torch.Tensor, q_rope: torch.Tensor, positions: torch.Tensor,
                      indices: torch.Tensor, scale: float) -> torch.Tensor:
        """`attend` over only the keys indices [B, T, K] at or before each query's position: [B, T, H, C]. Only
        the selected latents are read (gathered from the pool by slot, engine/paged_attention.py's
        `gather_sparse_attention`), never a row's whole context. model/mla.py's `attend_latent_sparse` (the
        same products over a dense context) is the reference."""
        i = self._layer(layer_idx)
        slots = paged_attention.key_slots(self.block_table, self.pool.block_size, indices)
        return paged_attention.gather_sparse_attention(q_latent, q_rope, self.pool.c_kv[i], self.pool.k_rope[i],
                                                       slots, indices <= positions[:, :, None], scale,
                                                       _GATHER_CHUNK_ELEMENTS)

    def slots(self) -> torch.Tensor:
        """[B, S] the pool slot of each row's key j (S = the longest context; past a row's end: block 0 or
        the tail of its last block, keys the positional mask hides)."""
        if self._slots is None:
            self._slots = paged_attention.block_slots(self.block_table, self.pool.block_size, self.num_keys)
        return self._slots

    def read(self, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, S, C] / [B, S, R] contexts gathered in position order (the naive path)."""
        i = self._layer(layer_idx)
        slots = self.slots()
        return self.pool.c_kv[i][slots], self.pool.k_rope[i][slots]

    def attend(self, layer_idx: int, q_latent: torch.Tensor, q_rope: torch.Tensor, positions: torch.Tensor,
               scale: float) -> torch.Tensor:
        """The absorbed path's read (model/mla.py's cache protocol): [B, T, H, C]."""
        args = (q_latent, q_rope, self.pool.c_kv, self.pool.k_rope, self._layer(layer_idx), self.block_table,
                positions, self.pool.block_size, scale)
        if self.read_impl == "blocks" and paged_attention.kernel_reads(self.pool.c_kv):
            return paged_attention.paged_latent_attention(*args)
        return paged_attention.gather_latent_attention(*args, slots=self.slots())

    def advance(self, num_tokens: int) -> None:
        """Lengths live in the engine's sequences; nothing to do here."""
