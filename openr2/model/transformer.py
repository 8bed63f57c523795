"""The whole causal LM: embeddings -> decoder layers (MLA + dense MLP or MoE) -> norm -> head.

`Transformer(config)` builds the model; `model(input_ids)` returns logits. Attribute names follow the
HF DeepSeek modules (embed_tokens, layers.i.self_attn.q_a_proj, ..., norm, lm_head) so model/hf_io.py only
adds the `model.` prefix and unstacks experts. The blocks are model/decoder.py's: `layers` holds
DecoderLayers, `mtp` the MTP modules.

DeepSeek-V4 (config.is_v4) composes other blocks under the same names: `layers` holds HyperDecoderLayers over
hc_mult residual streams (the embedding copied into each), `hc_head` collapses them before `norm`, and two
rope tables serve the layers (main for sliding windows, compressed for CSA/HCA). Its cache is a
compressed.CompressedCache (windows and compressor states), not the latent cache. Its MTP depths
(decoder.HyperMTPLayer) read the last layer's residual streams (`forward_mtp_v4`); they run without a cache.

Shape legend: B batch, T tokens, D hidden, V vocab.
"""

from __future__ import annotations

import torch
from torch import nn

from openr2.config import ModelConfig
from openr2.model.compressed import CompressedCache, CompressedCacheRows, v4_rotaries
from openr2.model.decoder import DecoderLayer, HyperDecoderLayer, HyperMTPLayer, MTPLayer, v4_mtp_config
from openr2.model.hyper import HyperConnection, HyperHead
from openr2.model.indexer import HeadWeights
from openr2.model.layers import KERNEL_IMPLS, Float32RMSNorm, Linear, RMSNorm
from openr2.model.mla import LatentCache
from openr2.model.moe import Gate, RoutedExperts
from openr2.model.moe_v4 import HashGate, ScoreGate
from openr2.model.rope import RotaryEmbedding

# modules whose parameters stay float32 whatever the model's dtype, as transformers keeps them: the router
# (`_keep_in_fp32_modules_strict`) and the indexer's head weights (`_keep_in_fp32_modules`)
FLOAT32_MODULES = (Gate, HeadWeights, ScoreGate, HashGate, HyperConnection, HyperHead, Float32RMSNorm)
# parameters kept float32 by name (DeepSeek-V4: attention sinks and compressors' position biases), as transformers'
# `_keep_in_fp32_modules_strict` keeps them
FLOAT32_PARAMS = ("sinks", "position_bias")


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        # no init draw of its own (init_weights or a checkpoint fills it, as the experts' tensors): on the meta device
        # (checkpoints.load_model) nn.Embedding's normal_ imports torch._dynamo, ~1.5-3 s of every start
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size,
                                         _weight=torch.empty(config.vocab_size, config.hidden_size))
        block = HyperDecoderLayer if config.is_v4 else DecoderLayer
        self.layers = nn.ModuleList(block(config, i) for i in range(config.num_hidden_layers))
        self.norm = (Float32RMSNorm if config.is_v4 else RMSNorm)(config.hidden_size, config.rms_norm_eps)
        self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        if config.is_v4:
            self.hc_head = HyperHead(config)
            self.rotary, self.rotary_compress = v4_rotaries(config)
            mtp_config = v4_mtp_config(config)
            self.mtp = nn.ModuleList(HyperMTPLayer(mtp_config, config.num_hidden_layers + k)
                                     for k in range(config.num_nextn_predict_layers))
        else:
            self.rotary = RotaryEmbedding(config)
            self.mtp = nn.ModuleList(MTPLayer(config, config.num_hidden_layers + k)
                                     for k in range(config.num_nextn_predict_layers))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                cache: LatentCache | None = None, attn_impl: str = "naive", moe_impl: str = "grouped",
                return_hidden: bool = False, logits_index: torch.Tensor | None = None, with_mtp: bool = False,
                kernel_impl: str = "eager"):
        """input_ids [B, T] -> logits [B, T, V] (and the final-normed hidden [B, T, D] if return_hidden).

        The caller picks every implementation: attn_impl (mla.ATTN_IMPLS: naive for prompts and training,
        absorbed for decode), moe_impl (moe.MOE_IMPLS: grouped by default, fused to train, decode in the
        compiled decode step) and kernel_impl (layers.KERNEL_IMPLS: eager, or compiled in that step).

        with_mtp: (logits, MTP draft logits of each depth) in one call, so data-parallel wrappers (DDP,
        FSDP) see every parameter used inside their forward.
        positions default to cache.length + 0..T-1; a given cache is written and advanced by T.
        logits_index [B] asks for one position per row: logits [B, V] (the engine's next-token rows); a
        pair (rows [M], positions [M]) for any M positions: logits [M, V] (rows verifying drafts).
        return_hidden: the final-normed hidden of every position [B, T, D], whatever logits_index picks.
        """
        if kernel_impl not in KERNEL_IMPLS:
            raise ValueError(f"kernel_impl must be one of {KERNEL_IMPLS}, got {kernel_impl!r}")
        B, T = input_ids.shape
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + T, device=input_ids.device).expand(B, T)
        x = self.embed_tokens(input_ids)
        streams = None
        if self.config.is_v4:
            streams = self._forward_v4(x, input_ids, positions, cache, attn_impl, moe_impl)
            x = self.hc_head(streams)
        else:
            cos, sin = self.rotary(positions, x.dtype)
            for layer in self.layers:
                x = layer(x, positions, cos, sin, cache, attn_impl, moe_impl, kernel_impl)
        if cache is not None:
            cache.advance(T)
        if return_hidden:
            hidden = self.norm(x)
            logits = self.lm_head(_select(hidden, logits_index), kernel_impl)
            return logits, hidden
        hidden = self.norm(_select(x, logits_index))
        logits = self.lm_head(hidden, kernel_impl)
        if with_mtp:
            if streams is not None:  # V4's MTP reads the residual streams, not the normed hidden
                return logits, self.forward_mtp_v4(streams, input_ids, positions, moe_impl)
            return logits, self.forward_mtp(hidden, input_ids, positions, moe_impl)
        return logits

    def _forward_v4(self, x, input_ids, positions, cache, attn_impl, moe_impl):
        """Embeddings [B, T, D] -> the last layer's residual streams [B, T, n, D] (hc_head and the final norm
        follow). attn_impl is compressed.V4_ATTN_IMPLS' (naive, sparse)."""
        if cache is not None and not isinstance(cache, (CompressedCache, CompressedCacheRows)):
            raise ValueError(f"DeepSeek-V4 needs a CompressedCache, got {type(cache).__name__}")
        steps = torch.arange(positions.shape[1], device=positions.device)
        if isinstance(cache, CompressedCacheRows):
            starts = torch.tensor([row.length for row in cache.rows], device=positions.device)
            if len(cache.rows) != positions.shape[0] or not bool((positions == starts[:, None] + steps).all()):
                raise ValueError("DeepSeek-V4 positions must continue each row's cache length")
        else:
            start = cache.length if cache is not None else 0
            if not bool((positions == start + steps).all()):  # compressors pool whole blocks from position 0 on
                raise ValueError(f"DeepSeek-V4 positions must run {start}..{start + positions.shape[1] - 1} in every "
                                 "row")
        ropes = {"main": self.rotary(positions, x.dtype), "compress": self.rotary_compress(positions, x.dtype),
                 "rotary": self.rotary_compress}
        x = x.unsqueeze(2).expand(-1, -1, self.config.hc_mult, -1).contiguous()
        for layer in self.layers:
            x = layer(x, positions, ropes, input_ids, moe_impl, cache, attn_impl)
        return x

    def forward_mtp_v4(self, streams: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor,
                       moe_impl: str = "grouped") -> list[torch.Tensor]:
        """DeepSeek-V4: draft logits of each MTP depth k = 1..D from the main model's last residual streams
        [B, T, n, D] (before its hc_head): depth k at position i combines H^{k-1}_i with Emb(t_{i+k}) and
        predicts t_{i+k+1}; T - k positions (as forward_mtp)."""
        T = input_ids.shape[1]
        drafts, h = [], streams
        for k, mtp in enumerate(self.mtp, start=1):
            if T - k <= 0:
                break
            pos = positions[:, : T - k]
            ropes = {"main": self.rotary(pos, h.dtype)}  # MTP blocks attend over a sliding window only
            h, normed = mtp(h[:, : T - k], self.embed_tokens(input_ids[:, k:]), pos, ropes, moe_impl)
            drafts.append(self.lm_head(normed))
        return drafts

    def draft(self, hidden: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor, cache,
              depth: int = 0, logits_index: torch.Tensor | None = None, attn_impl: str = "absorbed",
              moe_impl: str = "grouped", kernel_impl: str = "eager") -> tuple[torch.Tensor, torch.Tensor]:
        """MTP module `depth` as a drafter over a cache: hidden [B, T, D] (the main model's final-normed
        hidden at each position, or a previous draft step's block output), next_ids [B, T] (the token
        after each position) -> (draft logits at logits_index, as in forward; block output h [B, T, D])."""
        if self.config.is_v4:
            raise ValueError("DeepSeek-V4's MTP drafts over a cache are not built yet (forward_mtp_v4 has none)")
        cos, sin = self.rotary(positions, hidden.dtype)
        h, normed = self.mtp[depth](hidden, self.embed_tokens(next_ids), positions, cos, sin, moe_impl, cache,
                                    attn_impl, kernel_impl)
        return self.lm_head(_select(normed, logits_index), kernel_impl), h

    def draft_at(self, hidden: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor, cache,
                 index: torch.Tensor, depth: int = 0, moe_impl: str = "grouped",
                 kernel_impl: str = "eager") -> tuple[torch.Tensor, torch.Tensor]:
        """`draft` at one position per row, index [B] of T, over a cache: the MTP module's keys go into the
        cache at every position (later drafts attend over them), but the rest of its block (queries,
        attention, MoE), its norm and the head run at the indexed position alone (absorbed attention).
        Returns (draft logits [B, V], block output h [B, D]): draft's at that position, to rounding; the
        keys only cost the latent projection of each position."""
        mtp = self.mtp[depth]
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        if mtp.self_attn.indexer is not None:  # V3.2: its indexer's keys are needed at every position too
            logits, h = self.draft(hidden, next_ids, positions, cache, depth, index, "absorbed", moe_impl, kernel_impl)
            return logits, h[rows, index]
        cos, sin = self.rotary(positions, hidden.dtype)
        x = self._mtp_keys(mtp, hidden, next_ids, cos, sin, cache, kernel_impl)

        def at(t: torch.Tensor) -> torch.Tensor:
            return t[rows, index].unsqueeze(1)

        h = mtp.block(at(x), at(positions), at(cos), at(sin), _Written(cache), "absorbed", moe_impl, kernel_impl)[:, 0]
        return self.lm_head(mtp.shared_head.norm(h), kernel_impl), h

    def mtp_keys(self, hidden: torch.Tensor, next_ids: torch.Tensor, positions: torch.Tensor, cache,
                 depth: int = 0) -> None:
        """Only the keys of MTP module `depth` at every position into the cache (draft_at's first part): the
        positions of a prompt before the one a draft is read at."""
        cos, sin = self.rotary(positions, hidden.dtype)
        self._mtp_keys(self.mtp[depth], hidden, next_ids, cos, sin, cache)

    def _mtp_keys(self, mtp, hidden, next_ids, cos, sin, cache, kernel_impl="eager") -> torch.Tensor:
        x = mtp.combine(hidden, self.embed_tokens(next_ids))
        attn = mtp.self_attn
        cache.write(attn.layer_idx, *attn.latent_kv(mtp.input_layernorm(x), cos, sin, kernel_impl))
        return x

    def forward_mtp(self, hidden: torch.Tensor, input_ids: torch.Tensor | None, positions: torch.Tensor | None = None,
                    moe_impl: str = "grouped", embeds: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Draft logits of each MTP depth k = 1..D from the main model's final-normed hidden [B, T, D].

        Depth k at position i combines h^{k-1}_i with Emb(t_{i+k}) and predicts t_{i+k+1}; its logits have
        T - k positions. h^0 is the main model's hidden, h^k the output of depth k's block.
        embeds [B, T, D]: Emb(input_ids) given instead of input_ids (a pipeline's last stage, which has no
        embedding table, receives them from the first stage).
        """
        B, T = hidden.shape[:2]
        if positions is None:
            positions = torch.arange(T, device=hidden.device).expand(B, T)
        drafts, h = [], hidden
        for k, mtp in enumerate(self.mtp, start=1):
            if T - k <= 0:
                break
            pos = positions[:, : T - k]
            cos, sin = self.rotary(pos, h.dtype)
            e = self.embed_tokens(input_ids[:, k:]) if embeds is None else embeds[:, k:]
            h, normed = mtp(h[:, : T - k], e, pos, cos, sin, moe_impl)
            drafts.append(self.lm_head(normed))
        return drafts

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Fresh initialisation for training: normal(0, initializer_range) matrices, unit norms, zero biases."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                module.weight.normal_(0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, RMSNorm):
                module.weight.fill_(1.0)
            elif isinstance(module, nn.LayerNorm):  # the indexer's k_norm
                module.weight.fill_(1.0)
                module.bias.zero_()
            elif isinstance(module, HeadWeights):
                module.weight.normal_(0.0, std, generator=generator)
            elif isinstance(module, RoutedExperts):
                module.gate_up_proj.normal_(0.0, std, generator=generator)
                module.down_proj.normal_(0.0, std, generator=generator)
            elif isinstance(module, (HyperConnection, HyperHead)):
                fn = module.fn if isinstance(module, HyperConnection) else module.hc_fn
                fn.normal_(0.0, std, generator=generator)
            elif isinstance(module, (ScoreGate, HashGate)):
                module.weight.normal_(0.0, std, generator=generator)
                if isinstance(module, HashGate):  # a frozen random table: k distinct experts per token id
                    table = torch.rand(module.tid2eid.shape[0], module.weight.shape[0], generator=generator)
                    module.tid2eid.copy_(table.argsort(dim=-1)[:, : module.top_k])
                else:
                    module.e_score_correction_bias.zero_()
            elif isinstance(module, Gate):
                module.weight.normal_(0.0, std, generator=generator)
                if hasattr(module, "e_score_correction_bias"):
                    module.e_score_correction_bias.zero_()


class _Written:
    """A cache whose new keys are written already (draft_at): attends through it, writes nothing."""

    def __init__(self, cache):
        self.cache = cache

    def write(self, layer_idx: int, c_kv: torch.Tensor, k_rope: torch.Tensor) -> None:
        pass

    def attend(self, layer_idx, q_latent, q_rope, positions, scale):
        return self.cache.attend(layer_idx, q_latent, q_rope, positions, scale)

    def advance(self, num_tokens: int) -> None:
        pass


def _select(x: torch.Tensor, index) -> torch.Tensor:
    """x [B, T, D] at logits_index: None (every position), [B] (one position per row) or (rows, positions)."""
    if index is None:
        return x
    if isinstance(index, tuple):
        return x[index]
    return x[torch.arange(x.shape[0], device=x.device), index]


@torch.no_grad()
def greedy_full_forward(model: Transformer, input_ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
    """input_ids [B, T] -> [B, T + max_new_tokens]: greedy continuation by a full forward of the whole sequence
    per token (no cache; DeepSeek-V4 generates this way until it has one). Quadratic: for tests and checks."""
    seq = input_ids
    for _ in range(max_new_tokens):
        next_ids = model(seq, logits_index=torch.full((seq.shape[0],), seq.shape[1] - 1)).argmax(-1)
        seq = torch.cat((seq, next_ids[:, None]), dim=1)
    return seq


@torch.no_grad()
def greedy_cached(model: Transformer, input_ids: torch.Tensor, max_new_tokens: int,
                  attn_impl: str = "sparse") -> torch.Tensor:
    """As greedy_full_forward, through DeepSeek-V4's CompressedCache: the prompt once, then a token per step
    (CSA layers gathering their selected entries unless attn_impl says naive)."""
    cache = CompressedCache.for_model(model.config)
    last = torch.full((input_ids.shape[0],), input_ids.shape[1] - 1)
    logits = model(input_ids, cache=cache, logits_index=last, attn_impl=attn_impl)
    seq = input_ids
    for step in range(max_new_tokens):
        next_ids = logits.argmax(-1)
        seq = torch.cat((seq, next_ids[:, None]), dim=1)
        if step + 1 < max_new_tokens:
            logits = model(next_ids[:, None], cache=cache, attn_impl=attn_impl)[:, -1]
    return seq


def build_model(config: ModelConfig, dtype: torch.dtype = torch.float32, device="cpu", seed: int | None = 0):
    """A freshly initialised model (float32 router and indexer head weights whatever `dtype`)."""
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    model = Transformer(config)
    model.init_weights(gen)
    return cast_model(model, dtype).to(device)


def cast_model(model: Transformer, dtype: torch.dtype) -> Transformer:
    """Cast to `dtype`, keeping FLOAT32_MODULES (router weights and correction biases, the indexer's head
    weights; V4's hyper-connections and norms) and FLOAT32_PARAMS in float32 (as transformers does)."""
    model.to(dtype)
    for module in model.modules():
        if isinstance(module, FLOAT32_MODULES):
            module.float()
    for name, param in model.named_parameters():
        if name.rsplit(".", 1)[-1] in FLOAT32_PARAMS:
            param.data = param.data.float()
    return model
