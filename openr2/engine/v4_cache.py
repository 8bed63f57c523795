"""DeepSeek-V4's paged cache: the pool of its three cache kinds and the per-row view the model decodes with.

What a block of `block_size` tokens holds, per layer (model/compressed.py says what each thing is):
- every layer: the window's keys at the block's end, the rotated keys [Dh] of its last W - 1 tokens (what a
  forward starting at the next block boundary reads: a prefix-cache hit there finds its window; block_size
  >= W - 1, so a block's window costs (W - 1) / block_size keys per token, not one);
- CSA and HCA layers (compression rate M, block_size a multiple of M): the block's block_size / M entries [Dh];
- CSA layers: the indexer's entries [Di] (rate M too), and per overlapping compressor (the layer's, the
  indexer's) its overlap state at the block's end: the first halves of the block's last compression block,
  kv and gate (position bias added) [2, M, d].
Every kind is indexed by the same block table, so one prefix-cache hit and one copy-on-write cover them all,
and `from_budget` counts them all. A block is reusable once complete: at a block boundary no compression block
is pending (M divides block_size), so entries, indexer entries and overlap state there say everything.

The incomplete cache block's window keys (< block_size per layer) and the incomplete compression block's
projections (< M tokens per compressor) are per sequence: `V4RowState` rides on the sequence
(Sequence.cache_state) from one step to its next, valid at its `length`. A sequence
without a valid one (new, preempted and recomputed, a prefix-cache hit) starts at a block boundary, where the
state is rebuilt from the pool. The budget sets aside the most such state max_num_seqs sequences hold
(`row_state_bytes`).

`V4RowCache` is model/compressed.py's CompressedCache for one row (the model's cache protocol:
`extend_window`, `states`, `advance`), filled from the pool before the forward and written back by `advance`:
the window keys and overlap state at each block end this forward reached, the completed entries. The engine
runs V4 eagerly (engine/runner.py): decode rows together as CompressedCacheRows, prompt chunks a row each.
The compressors' entries are `PagedEntries`: on the gathered CSA path a query's selected entries are read
from the pool by row (k per query, not N); the indexer's entries (its scan scores them all), HCA's (all
attended) and the window's W - 1 keys are gathered per forward.

Shape legend: L layers, Dh head_dim, Di indexer head dim, M compression rate, W sliding window.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from openr2.config import ModelConfig
from openr2.model.compressed import CompressedCache, CompressorState

_GATE_DTYPE = torch.float32  # gates carry the float32 position bias (FLOAT32_PARAMS): float32 in any model dtype


@dataclass(frozen=True)
class V4RowState:
    """A sequence's running state after `length` tokens: per layer the window keys of its incomplete cache block
    [1, length % block_size, Dh], and a pair (layer's, indexer's) of its compressors' (pending_kv, pending_gate,
    prev_kv, prev_gate) or None. Never mutated: a fork shares it."""

    length: int
    keys: tuple
    states: tuple


class V4Pool:
    """The pool of a DeepSeek-V4 model's caches (the module docstring); KVPool's interface for the engine."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int = 64,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 num_layers: int | None = None):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1 (got {num_blocks}); raise the cache memory budget")
        L = config.num_hidden_layers
        if num_layers not in (None, L):
            raise ValueError("DeepSeek-V4 MTP layers have no paged cache yet (speculative decoding is off for V4)")
        self.rates = [config.compress_rate(i) for i in range(L)]
        bad = sorted({m for m in self.rates if m and block_size % m})
        unit = math.lcm(*(m for m in self.rates if m)) if any(self.rates) else 1
        fits = max(block_size, config.sliding_window - 1)
        hint = f"; for example block_size {-(-fits // unit) * unit}"
        if bad:
            raise ValueError(f"DeepSeek-V4 needs block_size a multiple of every compression rate (got "
                             f"{block_size}, rates {bad}): a complete block must hold whole compressed entries{hint}")
        if block_size < config.sliding_window - 1:
            raise ValueError(f"DeepSeek-V4 needs block_size >= sliding_window - 1 (got {block_size}, window "
                             f"{config.sliding_window}): a block keeps the window at its end{hint}")
        self.config, self.num_blocks, self.block_size, self.dtype = config, num_blocks, block_size, dtype
        self.num_layers, self.tail = L, config.sliding_window - 1  # window keys kept per block
        self.csa = [config.layer_types[i] == "compressed_sparse_attention" for i in range(L)]
        Dh, Di, bs = config.head_dim, config.index_head_dim, block_size
        z = dict(dtype=dtype, device=device)
        self.window = torch.zeros(L, num_blocks * self.tail, Dh, **z)
        self.entries = {i: torch.zeros(num_blocks * bs // m, Dh, **z) for i, m in enumerate(self.rates) if m}
        self.index_entries = {i: torch.zeros(num_blocks * bs // self.rates[i], Di, **z)
                              for i in range(L) if self.csa[i]}
        # overlap state at each block's end: [num_blocks, M, d] kv halves and gate halves, per compressor
        self.halves = {(i, j): (torch.zeros(num_blocks, self.rates[i], d, **z),
                                torch.zeros(num_blocks, self.rates[i], d, dtype=_GATE_DTYPE, device=device))
                       for i in range(L) if self.csa[i] for j, d in ((0, Dh), (1, Di))}

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        e, g = torch.empty((), dtype=dtype).element_size(), torch.empty((), dtype=_GATE_DTYPE).element_size()
        Dh, Di, bs = config.head_dim, config.index_head_dim, block_size
        total = 0
        for i in range(config.num_hidden_layers):
            m = config.compress_rate(i)
            total += (config.sliding_window - 1) * Dh * e
            if m:
                total += bs // m * Dh * e
            if config.layer_types[i] == "compressed_sparse_attention":
                total += bs // m * Di * e + m * (Dh + Di) * (e + g)
        return total

    @staticmethod
    def row_state_bytes(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        """The most a sequence's V4RowState holds: per layer block_size - 1 window keys; per compressor M - 1
        pending tokens' kv and gate projections (model dtype) and, overlapping ones, the last block's first
        halves (kv in the model dtype, gate float32)."""
        e, g = torch.empty((), dtype=dtype).element_size(), torch.empty((), dtype=_GATE_DTYPE).element_size()
        total = config.num_hidden_layers * (block_size - 1) * config.head_dim * e
        for i in range(config.num_hidden_layers):
            m = config.compress_rate(i)
            if not m:
                continue
            dims = [config.head_dim]
            if config.layer_types[i] == "compressed_sparse_attention":
                dims.append(config.index_head_dim)
            for d in dims:
                overlap = len(dims) == 2
                total += (m - 1) * (2 * d if overlap else d) * 2 * e + (m * d * (e + g) if overlap else 0)
        return total

    @classmethod
    def from_budget(cls, config: ModelConfig, budget_bytes: int, block_size: int = 64,
                    dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                    num_layers: int | None = None, max_num_seqs: int = 0) -> V4Pool:
        """As many blocks as fit `budget_bytes` once max_num_seqs running sequences' states are set aside, a block
        costing what every layer's kinds store for it."""
        budget = budget_bytes - max_num_seqs * cls.row_state_bytes(config, block_size, dtype)
        per_block = cls.bytes_per_block(config, block_size, dtype)
        return cls(config, int(max(0, budget) // per_block), block_size, dtype, device, num_layers)

    @property
    def nbytes(self) -> int:
        tensors = [self.window, *self.entries.values(), *self.index_entries.values()]
        tensors += [t for pair in self.halves.values() for t in pair]
        return sum(t.numel() * t.element_size() for t in tensors)

    def copy_block(self, src: int, dst: int, num_tokens: int) -> None:
        """Copy the first num_tokens tokens of block src into block dst (copy-on-write for forked samples): their
        complete entries (a fork shares the incomplete block's window keys and pending projections in its
        V4RowState)."""
        bs = self.block_size
        for table in (self.entries, self.index_entries):
            for i, t in table.items():
                per, n = bs // self.rates[i], num_tokens // self.rates[i]
                t[dst * per : dst * per + n] = t[src * per : src * per + n]

    def _block_fields(self):
        """(name, [num_blocks, ...] view of the pool) of each compressed kind a block holds."""
        for name, table in (("entries", self.entries), ("index_entries", self.index_entries)):
            for i, t in table.items():
                yield f"{name}.{i}", t.view(self.num_blocks, self.block_size // self.rates[i], -1)
        for (i, j), (kv, gate) in self.halves.items():
            yield f"halves.{i}.{j}.kv", kv
            yield f"halves.{i}.{j}.gate", gate

    def export_blocks(self, blocks: list[int]) -> dict[str, torch.Tensor]:
        """Copies of what the pool holds for `blocks` (the disk tier, engine/disk_cache.py): name -> [n, ...], the
        window keys as [n, layers, W - 1, Dh]."""
        index = torch.tensor(blocks, dtype=torch.long, device=self.window.device)
        window = self.window.view(self.num_layers, self.num_blocks, self.tail, -1)
        out = {"window": window.index_select(1, index).transpose(0, 1).contiguous()}
        return out | {name: t.index_select(0, index).contiguous() for name, t in self._block_fields()}

    def import_blocks(self, blocks: list[int], tensors: dict[str, torch.Tensor]) -> None:
        """Write export_blocks' tensors (for other blocks, or another process's pool of this layout) into `blocks`."""
        index = torch.tensor(blocks, dtype=torch.long, device=self.window.device)
        window, src = self.window.view(self.num_layers, self.num_blocks, self.tail, -1), tensors["window"]
        for i in range(self.num_layers):  # a layer's window is contiguous in the pool
            window[i].index_copy_(0, index, src[:, i].to(window.device, window.dtype))
        for name, t in self._block_fields():
            t.index_copy_(0, index, tensors[name].to(t.device, t.dtype))

    def row_cache(self, block_table: list[int], length: int, state: V4RowState | None) -> V4RowCache:
        """The cache for one row's forward of tokens from `length` on; `state` the row's V4RowState at that
        length, or None at a block boundary (rebuilt from the pool)."""
        return V4RowCache(self, block_table, length, state)

    def entry_slots(self, table: torch.Tensor, rate: int, w: torch.Tensor) -> torch.Tensor:
        """Pool rows of a sequence's entries w (any shape) at `rate` tokens per entry, through its block table."""
        per = self.block_size // rate
        return table[w // per] * per + w % per


@dataclass
class PagedEntries(CompressorState):
    """A compressor's entries for one row's forward (model/compressed.py's entries protocol): the first `stored`
    in the pool (`store`, the layer's entries there), this forward's new ones in `new` until `advance` writes
    them. `take` reads only the selected entries' rows; `all` gathers every entry (HCA, the indexer's scan)."""

    pool: V4Pool | None = None
    store: torch.Tensor | None = None  # [pool entries, d]
    table: torch.Tensor | None = None
    rate: int = 0
    stored: int = 0
    new: torch.Tensor | None = None  # [1, n, d]
    _all: torch.Tensor | None = field(default=None, repr=False)

    @property
    def num_entries(self) -> int:
        return self.stored + (0 if self.new is None else self.new.shape[1])

    def extend(self, new: torch.Tensor) -> None:
        self.new = new if self.new is None else torch.cat((self.new, new), dim=1)
        self._all = None

    def all(self) -> torch.Tensor:
        if self._all is None:
            w = torch.arange(self.stored, device=self.store.device)
            parts = [self.store.index_select(0, self.pool.entry_slots(self.table, self.rate, w))[None]]
            if self.new is not None:
                parts.append(self.new)
            self._all = torch.cat(parts, dim=1)
        return self._all

    def take(self, indices: torch.Tensor) -> torch.Tensor:
        B, T, k = indices.shape
        d, flat = self.store.shape[-1], indices.reshape(-1)
        if self.num_entries == 0:
            return self.store.new_zeros(B, T, k, d)
        if self.stored:
            slots = self.pool.entry_slots(self.table, self.rate, flat.clamp(max=self.stored - 1))
            out = self.store.index_select(0, slots)
        if self.new is not None and self.new.shape[1]:
            fresh = self.new[0].index_select(0, (flat - self.stored).clamp(min=0))
            out = fresh if not self.stored else torch.where((flat < self.stored)[:, None], out, fresh)
        return out.view(B, T, k, d)


class V4RowCache(CompressedCache):
    """model/compressed.py's CompressedCache for one row, read from and written back to a V4Pool."""

    def __init__(self, pool: V4Pool, block_table: list[int], length: int, state: V4RowState | None):
        super().__init__(pool.num_layers)
        if state is not None and state.length != length:
            raise ValueError(f"row state is for {state.length} tokens, not {length}")
        if state is None and length % pool.block_size:
            raise ValueError(f"a DeepSeek-V4 row without its running state must start at a block boundary "
                             f"(block_size {pool.block_size}), not at {length}")
        self.pool, self.length, self.start = pool, length, length
        device = pool.window.device
        self.table = torch.tensor(block_table, dtype=torch.long, device=device)
        self.new_keys: dict[int, torch.Tensor] = {}
        bs, tail = pool.block_size, pool.tail
        self.base = length - length % bs  # the incomplete cache block's first position
        self.partial = [state.keys[i] if state is not None else None for i in range(pool.num_layers)]
        first = max(0, length - tail)  # the window before this forward: positions first..length-1
        for i in range(pool.num_layers):
            parts = []
            if first < self.base:  # the previous block's last base - first keys
                block = int(self.table[self.base // bs - 1])
                parts.append(pool.window[i, (block + 1) * tail - (self.base - first) : (block + 1) * tail])
            if length > self.base:
                parts.append(self.partial[i][0, max(first, self.base) - self.base :])
            if parts:
                self.windows[i] = torch.cat(parts)[None]
            m = pool.rates[i]
            if not m:
                continue
            kinds = [pool.entries] + ([pool.index_entries] if pool.csa[i] else [])
            paged = []
            for j, entries in enumerate(kinds):
                st = PagedEntries(pool=pool, store=entries[i], table=self.table, rate=m, stored=length // m)
                paged.append(st)
                if state is not None and state.states[i][j] is not None:
                    st.pending_kv, st.pending_gate, st.prev_kv, st.prev_gate = state.states[i][j]
                elif pool.csa[i] and length:  # at a block boundary: the overlap state stored at its end
                    kv, gate = pool.halves[(i, j)]
                    block = self.table[length // pool.block_size - 1]
                    st.prev_kv, st.prev_gate = kv[block][None], gate[block][None]
            self.states[i] = (*paged, CompressorState())[:2]

    def extend_window(self, layer_idx, kv, positions, window):
        self.new_keys[layer_idx] = kv
        return super().extend_window(layer_idx, kv, positions, window)

    def advance(self, num_tokens: int) -> None:
        """After the model's last layer: write this forward's keys, entries and overlap states to the pool."""
        pool, start, end = self.pool, self.start, self.start + num_tokens
        bs, tail = pool.block_size, pool.tail
        for i in range(pool.num_layers):
            keys = self.new_keys[i][0].to(pool.dtype)  # positions base..end-1
            if self.partial[i] is not None:
                keys = torch.cat((self.partial[i][0], keys))
            for b in range(start // bs, end // bs):  # blocks this forward completed: keep their last keys
                block, e = int(self.table[b]), (b + 1) * bs - self.base
                pool.window[i, block * tail : (block + 1) * tail] = keys[e - tail : e]
            self.partial[i] = keys[end // bs * bs - self.base :][None].clone()
            m = pool.rates[i]
            if not m or end // m == start // m:
                continue
            n0, n1 = start // m, end // m
            kinds = [pool.entries] + ([pool.index_entries] if pool.csa[i] else [])
            for j, entries in enumerate(kinds):
                st = self.states[i][j]
                w = torch.arange(n0, n1, device=self.table.device)
                entries[i].index_copy_(0, pool.entry_slots(self.table, m, w), st.new[0].to(pool.dtype))
                if not pool.csa[i]:
                    continue
                kv_halves, gate_halves = st.block_halves  # [1, n1 - n0, M, d]: compression blocks n0..n1-1
                kv, gate = pool.halves[(i, j)]
                bs = pool.block_size
                for b in range(start // bs, end // bs):  # blocks whose end this forward reached
                    w = (b + 1) * bs // m - 1 - n0
                    kv[self.table[b]] = kv_halves[0, w].to(kv.dtype)
                    gate[self.table[b]] = gate_halves[0, w].to(gate.dtype)
        super().advance(num_tokens)

    def row_state(self) -> V4RowState:
        """The compressors' running state after this forward (copies: the slices would keep the forward's
        projections alive)."""
        states = []
        for i in range(self.pool.num_layers):
            pair = []
            for st in self.states[i]:
                parts = (st.pending_kv, st.pending_gate, st.prev_kv, st.prev_gate)
                pair.append(None if st.pending_kv is None else tuple(
                    None if t is None else t.clone() for t in parts))
            states.append(tuple(pair))
        return V4RowState(self.length, tuple(self.partial), tuple(states))
