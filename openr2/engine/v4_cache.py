"""DeepSeek-V4's paged cache: the pool of its three cache kinds and the per-row view the model decodes with.

What a block of `block_size` tokens holds, per layer (model/compressed.py says what each thing is):
- every layer: the window's keys at the block's end, the rotated keys [Dh] of its last W - 1 tokens (what a
  forward starting at the next block boundary reads: a prefix-cache hit there finds its window; block_size
  >= W - 1);
- CSA and HCA layers (compression rate M, block_size a multiple of M): the block's block_size / M entries [Dh];
- CSA layers: the indexer's entries [Di] (rate M too), and per overlapping compressor (the layer's, the
  indexer's) its overlap state at the block's end: the first halves of the block's last compression block,
  kv and gate (position bias added) [2, M, d].
Every kind is indexed by the same block table, so one prefix-cache hit and one copy-on-write cover them all,
and `from_budget` counts them all. A block is reusable once complete: at a block boundary no compression block
is pending (M divides block_size), so entries, indexer entries and overlap state there say everything.

A running sequence's state between steps is `V4RowState`, riding on the sequence (Sequence.cache_state), valid
at its `length`: per layer its window (the last W - 1 keys: a ring's worth, whatever the block size) and each
compressor's incomplete compression block (< M tokens' projections) and overlap halves. A sequence without a
valid one (new, preempted and recomputed, a prefix-cache hit) starts at a block boundary, where the state is
rebuilt from the pool. The budget sets aside the most such state max_num_seqs sequences hold
(`row_state_bytes`). So the pool's window costs (W - 1) / block_size keys per token per layer: blocks of 4W
(512 for the release's window of 128) keep it under a quarter of a key; prefix hits are whole blocks anyway.

`V4RowCache` is model/compressed.py's CompressedCache for one row (the model's cache protocol:
`extend_window`, `states`, `advance`), built from the row state (or the pool at a block boundary) before the
forward; compressors' entries are `PagedEntries`, written to the pool as they complete; `advance` writes the
window keys and overlap state at each block end the forward reached. A decode step reads in place: the window
from the row state, the CSA indexer's entries scanned where they lie by the fused kernel
(engine/paged_attention.py's `paged_index_scores`, entry blocks of block_size / M rows), then only the selected
index_topk entries gathered by row (`take`); HCA's entries (1/128 of the context, all attended) are gathered.
The engine runs V4 eagerly (engine/runner.py): decode rows together as CompressedCacheRows, prompt chunks a row
each.

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
    """A sequence's running state after `length` tokens: per layer its window, the last min(length, W - 1) keys
    [1, n, Dh] (a ring's worth: whatever the block size), and a pair (layer's, indexer's) of its compressors'
    (pending_kv, pending_gate, prev_kv, prev_gate) or None. Never mutated: a fork shares it."""

    length: int
    keys: tuple
    states: tuple


def _entry_unit(config: ModelConfig) -> int:
    """The least common multiple of the model's compression rates (1 without any)."""
    rates = [config.compress_rate(i) for i in range(config.num_hidden_layers)]
    return math.lcm(*(m for m in rates if m)) if any(rates) else 1


class V4Pool:
    """The pool of a DeepSeek-V4 model's caches (the module docstring); KVPool's interface for the engine."""

    @staticmethod
    def default_block_size(config: ModelConfig) -> int:
        """The engine's block size for this model unless told: the smallest that holds whole compressed entries
        of every rate and keeps the window's W - 1 keys at most a quarter key per token (>= 4 W)."""
        unit = _entry_unit(config)
        return -(-4 * config.sliding_window // unit) * unit

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
        unit = _entry_unit(config)
        fits = max(block_size, config.sliding_window - 1)
        hint = f"; for example block_size {-(-fits // unit) * unit}"
        if -(-fits // unit) * unit < 4 * config.sliding_window:  # the smallest valid one; 4W: a quarter key per token
            hint += f" ({self.default_block_size(config)} keeps the window's keys at a quarter per token)"
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
        """The most a sequence's V4RowState holds: per layer W - 1 window keys; per compressor M - 1
        pending tokens' kv and gate projections (model dtype) and, overlapping ones, the last block's first
        halves (kv in the model dtype, gate float32)."""
        e, g = torch.empty((), dtype=dtype).element_size(), torch.empty((), dtype=_GATE_DTYPE).element_size()
        total = config.num_hidden_layers * (config.sliding_window - 1) * config.head_dim * e
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
    """A compressor's entries for one row's forward (model/compressed.py's entries protocol), kept in the pool:
    the first `stored` are there when the forward starts, and `extend` writes this forward's new ones there at
    once (their blocks are the row's own: a forward only completes entries in blocks past its prefix-cache
    hit). `take` reads only the selected entries' rows; `index_scores` (the indexer's entries) scans them in
    place through the block table (engine/paged_attention.py's fused scan: neither a copy of the entries nor
    the [Hi, N] products is made); `all` gathers every entry (HCA's, attended whole: 1/128 of the context)."""

    pool: V4Pool | None = None
    store: torch.Tensor | None = None  # [pool entries, d]
    table: torch.Tensor | None = None
    stored: int = 0
    _all: torch.Tensor | None = field(default=None, repr=False)

    @property
    def num_entries(self) -> int:
        return self.stored

    def extend(self, new: torch.Tensor) -> None:
        n = new.shape[1]
        if n:
            w = torch.arange(self.stored, self.stored + n, device=self.store.device)
            self.store.index_copy_(0, self.pool.entry_slots(self.table, self.rate, w), new[0].to(self.store.dtype))
            self.stored += n
            self._all = None

    def slots(self) -> torch.Tensor:
        """Pool rows of entries 0..stored-1."""
        return self.pool.entry_slots(self.table, self.rate, torch.arange(self.stored, device=self.store.device))

    def all(self) -> torch.Tensor:
        if self._all is None:
            self._all = self.store.index_select(0, self.slots())[None]
        return self._all

    def take(self, indices: torch.Tensor) -> torch.Tensor:
        B, T, k = indices.shape
        if self.stored == 0:
            return self.store.new_zeros(B, T, k, self.store.shape[-1])
        slots = self.pool.entry_slots(self.table, self.rate, indices.reshape(-1).clamp(max=self.stored - 1))
        return self.store.index_select(0, slots).view(B, T, k, -1)

    def index_scores(self, q: torch.Tensor, weights: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        from openr2.engine import paged_attention

        if not self.stored or not paged_attention.kernel_reads(self.store):
            return super().index_scores(q, weights, positions)
        per = self.pool.block_size // self.rate  # entries per cache block: the scan's block size
        last = (positions + 1) // self.rate - 1  # the query's last visible entry (-1: none yet)
        scores = paged_attention.paged_index_scores(
            q, weights, self.store[None], 0, self.table[None, : -(-self.stored // per)], last.clamp(min=0),
            self.stored, per, q.shape[-1] ** -0.5)
        return scores.masked_fill_((last < 0)[..., None], float("-inf"))


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
        self.table = torch.tensor(block_table, dtype=torch.long, device=pool.window.device)
        self.new_keys: dict[int, torch.Tensor] = {}
        bs, tail = pool.block_size, pool.tail
        for i in range(pool.num_layers):
            if state is not None:  # the window before this forward: its last min(length, W - 1) keys
                self.windows[i] = state.keys[i]
            elif length:  # at a block boundary: the window kept at the previous block's end
                block = int(self.table[length // bs - 1])
                self.windows[i] = pool.window[i, block * tail + max(0, tail - length) : (block + 1) * tail][None]
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
                    block = self.table[length // bs - 1]
                    st.prev_kv, st.prev_gate = kv[block][None], gate[block][None]
            self.states[i] = (*paged, CompressorState())[:2]

    def extend_window(self, layer_idx, kv, positions, window):
        keys, key_positions = super().extend_window(layer_idx, kv, positions, window)
        self.new_keys[layer_idx] = keys  # the window before this forward, then its keys: what `advance` writes
        return keys, key_positions

    def advance(self, num_tokens: int) -> None:
        """After the model's last layer: write the window keys and overlap states at each block end this forward
        reached to the pool (its new entries are there already: PagedEntries.extend)."""
        pool, start, end = self.pool, self.start, self.start + num_tokens
        bs, tail = pool.block_size, pool.tail
        ends = range(start // bs + 1, end // bs + 1)  # blocks this forward completed (1-based: block e ends at e bs)
        for i in range(pool.num_layers):
            if not ends:
                break
            keys = self.new_keys[i][0]  # positions first..end-1
            first = end - keys.shape[0]
            for e in ends:
                block = int(self.table[e - 1])
                pool.window[i, block * tail : (block + 1) * tail] = keys[e * bs - tail - first : e * bs - first]
            if not pool.csa[i]:
                continue
            m = pool.rates[i]
            n0 = start // m
            for j in range(2):
                kv_halves, gate_halves = self.states[i][j].block_halves  # [1, n, M, d]: compression blocks n0..
                kv, gate = pool.halves[(i, j)]
                for e in ends:
                    w = e * bs // m - 1 - n0
                    kv[self.table[e - 1]] = kv_halves[0, w].to(kv.dtype)
                    gate[self.table[e - 1]] = gate_halves[0, w].to(gate.dtype)
        super().advance(num_tokens)

    def row_state(self) -> V4RowState:
        """The running state after this forward: each layer's window (its last W - 1 keys) and the compressors'
        state (copies: slices would keep the forward's projections alive)."""
        states = []
        for i in range(self.pool.num_layers):
            pair = []
            for st in self.states[i]:
                parts = (st.pending_kv, st.pending_gate, st.prev_kv, st.prev_gate)
                pair.append(None if st.pending_kv is None else tuple(
                    None if t is None else t.clone() for t in parts))
            states.append(tuple(pair))
        keys = tuple(None if w is None else w.to(self.pool.dtype).clone() for w in self.windows)
        return V4RowState(self.length, keys, tuple(states))
