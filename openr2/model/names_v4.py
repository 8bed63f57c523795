"""DeepSeek-V4 tensor names: ours (transformers' module names) -> the release's, and -> what transformers'
save_pretrained writes. model/hf_io.py reads and writes through these.

The release names (DeepSeek's `inference/model.py`: `embed`, `layers.N.attn.wq_a`, `ffn.experts.E.w1`,
`hc_attn_fn`, `attn_sink`, `indexer.compressor.ape`, ...) are transformers' `conversion_mapping.py` entry
"deepseek_v4" read backwards. transformers 5.24 saves a V4 model by undoing those renames on its own names,
which leaves a mixture: `model.` + the release name for nearly everything, but `model.embed_tokens.weight`,
`head.weight` and `model.hc_head.hc_{fn,base,scale}` (its anchored patterns do not undo under the prefix).
Both layouts load; openr2 writes transformers' (which transformers loads).

In the release, quantized weights carry `<module>.scale` (transformers: `<module>.weight_scale_inv`).

The MTP depths (`mtp.{k}.*` in the release; transformers drops them on load and never writes them) keep
the release's names in both layouts: `enorm`, `hnorm`, `e_proj`, `h_proj`, `norm`, `hc_head_{fn,base,scale}`
and a layer's names for the block (`attn.*`, `ffn.*`, `attn_norm`, `hc_attn_fn`, ...), as vLLM reads them.
"""

from __future__ import annotations

import re

_TOP = {"embed_tokens.weight": "embed.weight", "lm_head.weight": "head.weight", "norm.weight": "norm.weight",
        "hc_head.hc_fn": "hc_head_fn", "hc_head.hc_base": "hc_head_base", "hc_head.hc_scale": "hc_head_scale"}
_LAYER = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
          **{f"{hc}.{p}": f"hc_{short}_{p}" for hc, short in (("attn_hc", "attn"), ("ffn_hc", "ffn"))
             for p in ("fn", "base", "scale")}}
_ATTN = {"q_a_proj": "wq_a", "q_a_norm": "q_norm", "q_b_proj": "wq_b", "kv_proj": "wkv", "kv_norm": "norm",
         "o_a_proj": "wo_a", "o_b_proj": "wo_b"}
_COMPRESSOR = {"kv_proj.weight": "wkv.weight", "gate_proj.weight": "wgate.weight", "kv_norm.weight": "norm.weight",
               "position_bias": "ape"}
_MLP = {"gate.weight": "gate.weight", "gate.e_score_correction_bias": "gate.bias", "gate.tid2eid": "gate.tid2eid",
        "shared_experts.gate_proj.weight": "shared_experts.w1.weight",
        "shared_experts.down_proj.weight": "shared_experts.w2.weight",
        "shared_experts.up_proj.weight": "shared_experts.w3.weight"}
_MTP = {**{f"{n}.weight": f"{n}.weight" for n in ("enorm", "hnorm", "e_proj", "h_proj", "norm")},
        **{f"hc_head.hc_{p}": f"hc_head_{p}" for p in ("fn", "base", "scale")}}
_EXPERTS = {"experts.gate_up_proj": ("w1", "w3"), "experts.down_proj": ("w2",)}


def _attn(rest: str) -> str:
    if rest == "sinks":
        return "attn_sink"
    if rest == "compressor.indexer.q_b_proj.weight":
        return "indexer.wq_b.weight"
    if rest == "compressor.indexer.scorer.weights_proj.weight":
        return "indexer.weights_proj.weight"
    for prefix, to in (("compressor.indexer.", "indexer.compressor."), ("compressor.", "compressor.")):
        if rest.startswith(prefix) and rest[len(prefix):] in _COMPRESSOR:
            return to + _COMPRESSOR[rest[len(prefix):]]
    module, _, tensor = rest.partition(".")
    if module in _ATTN and tensor == "weight":
        return f"{_ATTN[module]}.weight"
    raise KeyError(rest)


def release_names(ours: str, num_experts: int) -> list[str]:
    """The release tensor(s) of one of our parameters (stacked experts: per expert, w1 and w3 or w2)."""
    if ours in _TOP:
        return [_TOP[ours]]
    m = re.match(r"^(layers|mtp)\.(\d+)\.(.*)$", ours)
    if m:
        layer, rest = f"{m.group(1)}.{m.group(2)}.", m.group(3)
        if m.group(1) == "mtp":
            if rest in _MTP:
                return [layer + _MTP[rest]]
        if rest in _LAYER:
            return [layer + _LAYER[rest]]
        if rest.startswith("self_attn."):
            try:
                return [layer + "attn." + _attn(rest[len("self_attn."):])]
            except KeyError:
                pass
        if rest.startswith("mlp."):
            tail = rest[len("mlp."):]
            if tail in _MLP:
                return [layer + "ffn." + _MLP[tail]]
            if tail in _EXPERTS:
                return [f"{layer}ffn.experts.{e}.{w}.weight" for e in range(num_experts) for w in _EXPERTS[tail]]
    raise ValueError(f"no DeepSeek-V4 release name for parameter {ours!r}")


def transformers_name(release: str) -> str:
    """The name transformers 5.24's save_pretrained gives a release tensor (see the module docstring)."""
    if release == "head.weight" or release.startswith("mtp."):
        return release
    if release == "embed.weight":
        return "model.embed_tokens.weight"
    if release.startswith("hc_head_"):
        return "model.hc_head.hc_" + release[len("hc_head_"):]
    return "model." + release


def release_scale_name(weight: str) -> str:
    """`<module>.weight` -> the release's `<module>.scale` (its FP8 / FP4 block scales)."""
    return weight.removesuffix(".weight") + ".scale"
