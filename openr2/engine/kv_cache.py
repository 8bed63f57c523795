"""Paged latent KV cache: the tensor pool and the per-forward view the model writes and reads.

Per layer and token only MLA's normalised latent c_kv [C] and rotated rope key k_rope [R] are stored, in
fixed-size blocks (64 tokens by default) of one pool sized from a memory budget. Which block belongs to
which sequence is the block manager's business (prefix_cache.py); this file only moves numbers.

`PagedView` implements the cache protocol of openr2.model.mla (update / advance) for one forward over a
padded batch: new tokens are scattered into their slots, then each row's whole context is gathered back
in position order, so key j of row b sits at position j and MLA's positional causal mask also hides the
padding past each row's context.

Shape legend: L layers, N slots (num_blocks * block_size), B rows, T new tokens per row (padded),
S context per row (padded), C kv_lora_rank, R rope dim.
"""

from __future__ import annotations

import torch

from openr2.config import ModelConfig


def bytes_per_token(config: ModelConfig, dtype: torch.dtype, num_layers: int | None = None) -> int:
    """Cache bytes one token takes across all cached layers: L x (C + R) elements."""
    elem = torch.empty((), dtype=dtype).element_size()
    return (num_layers or config.num_hidden_layers) * (config.kv_lora_rank + config.qk_rope_head_dim) * elem


class KVPool:
    """num_layers: cached layers, indexed by the attention's layer_idx; the decoder layers by default, plus
    the MTP layers (indices L..L+D-1) when the engine drafts with them."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int = 64,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 num_layers: int | None = None):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1 (got {num_blocks}); raise the cache memory budget")
        self.num_blocks, self.block_size = num_blocks, block_size
        slots = num_blocks * block_size
        L = num_layers or config.num_hidden_layers
        self.c_kv = torch.zeros(L, slots, config.kv_lora_rank, dtype=dtype, device=device)
        self.k_rope = torch.zeros(L, slots, config.qk_rope_head_dim, dtype=dtype, device=device)

    @classmethod
    def from_budget(cls, config: ModelConfig, budget_bytes: int, block_size: int = 64,
                    dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                    num_layers: int | None = None) -> KVPool:
        num_blocks = budget_bytes // (block_size * bytes_per_token(config, dtype, num_layers))
        return cls(config, int(num_blocks), block_size, dtype, device, num_layers)

    @property
    def nbytes(self) -> int:
        return self.c_kv.numel() * self.c_kv.element_size() + self.k_rope.numel() * self.k_rope.element_size()

    def copy_block(self, src: int, dst: int, num_tokens: int) -> None:
        """Copy the first num_tokens slots of block src into block dst (copy-on-write for forked samples)."""
        s, d = src * self.block_size, dst * self.block_size
        self.c_kv[:, d : d + num_tokens] = self.c_kv[:, s : s + num_tokens]
        self.k_rope[:, d : d + num_tokens] = self.k_rope[:, s : s + num_tokens]

    def view(self, block_tables: list[list[int]], num_computed: list[int], num_new: list[int]) -> PagedView:
        """The cache for one forward: row b has num_computed[b] cached tokens and num_new[b] new ones."""
        return PagedView(self, block_tables, num_computed, num_new)


class PagedView:
    def __init__(self, pool: KVPool, block_tables: list[list[int]], num_computed: list[int], num_new: list[int]):
        self.pool = pool
        bs = pool.block_size
        device = pool.c_kv.device
        contexts = [done + new for done, new in zip(num_computed, num_new)]
        S = max(contexts)
        # Every row's slots from its block table in one go, as few tensor ops as possible (a decode step is
        # ~1 ms). Beyond a row's own context the gather reads block 0 or the tail of its last block: keys
        # the causal mask hides (each query sees key positions up to its own).
        width = -(-S // bs)
        tables = [table[: -(-ctx // bs)] for table, ctx in zip(block_tables, contexts)]
        blocks = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long)
        gather = (blocks[:, :, None] * bs + torch.arange(bs)).view(len(tables), -1)[:, :S]
        write_rows, write_cols, write_positions = [], [], []
        for b, (done, new) in enumerate(zip(num_computed, num_new)):
            write_rows += [b] * new
            write_cols += range(new)
            write_positions += range(done, done + new)
        rows = torch.tensor(write_rows)
        self.gather = gather.to(device)
        self.write_slots = gather[rows, torch.tensor(write_positions)].to(device)
        self.write_index = (rows.to(device), torch.tensor(write_cols, device=device))

    def update(self, layer_idx: int, c_kv: torch.Tensor, k_rope: torch.Tensor):
        """Scatter the new tokens' c_kv [B, T, C] / k_rope [B, T, R]; return [B, S, C] / [B, S, R] contexts."""
        pool_c, pool_r = self.pool.c_kv[layer_idx], self.pool.k_rope[layer_idx]
        pool_c.index_copy_(0, self.write_slots, c_kv[self.write_index].to(pool_c.dtype))
        pool_r.index_copy_(0, self.write_slots, k_rope[self.write_index].to(pool_r.dtype))
        return pool_c[self.gather].to(c_kv.dtype), pool_r[self.gather].to(k_rope.dtype)

    def advance(self, num_tokens: int) -> None:
        """Lengths live in the engine's sequences; nothing to do here."""
