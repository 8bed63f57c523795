"""ModelConfig: the architecture of a DeepSeek-V2/V3/V3.2 model, read from and written to HF `config.json`.

Owns key names (verbatim from the checkpoints), defaults per `model_type`, validation and derived
values. It does not build modules (model/) or know tensor names (model/hf_io.py).

DeepSeek-V3.2 (`model_type: deepseek_v32`) is V3 plus DeepSeek Sparse Attention: every attention layer has a
lightning indexer (`index_n_heads` x `index_head_dim`, keeping the `index_topk` best keys per query). Its
transformers class fixes what V3 leaves to the config (sigmoid noaux_tc routing, MoE in every layer after
the dense ones, interleaved MLA rope, a q LoRA), so a V3.2 config that says otherwise is refused rather than
read as something transformers would compute differently.

DeepSeek-V4 (`model_type: deepseek_v4`) is not MLA: one shared 512-dim KV head per layer with partial rotary
(`head_dim`, `qk_rope_head_dim` = head_dim x partial_rotary_factor), an attention kind per layer
(`layer_types`: sliding window, CSA = 4:1 compressed entries picked by an indexer, HCA = 128:1 entries attended
densely; `compress_rates`), hyper-connections (`hc_mult` streams, `hc_sinkhorn_iters`, `hc_eps`), a grouped
low-rank output projection (`o_groups` x `o_lora_rank`), sqrtsoftplus routing with hash-routed layers
(`mlp_layer_types`) and clipped SwiGLU (`swiglu_limit`). Here `rope_theta` is the main (sliding) table's
base and `rope_scaling` the YaRN of the compressed branches, whose base is `compress_rope_theta` (transformers
nests both under `rope_parameters.main` / `.compress`). The MLA keys (kv_lora_rank, qk_nope_head_dim,
v_head_dim, n_group...) mean nothing for V4 and are neither read nor written.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "deepseek_v32", "deepseek_v4")
ROUTING_METHODS = {  # topk_method -> scoring_func it needs
    "greedy": "softmax",
    "group_limited_greedy": "softmax",
    "noaux_tc": "sigmoid",
}
V4_LAYER_TYPES = ("sliding_attention", "compressed_sparse_attention", "heavily_compressed_attention")
V4_MLP_LAYER_TYPES = ("hash_moe", "moe")
_V4_RATIO_TO_LAYER_TYPE = {0: "sliding_attention", 4: "compressed_sparse_attention",
                           128: "heavily_compressed_attention"}  # the release's `compress_ratios`
_DYNAMIC_ROUTING_KEYS = ("routing_top_p", "routing_min_k", "routing_compute_penalty")
# V4's own keys (None for the other model types), written to config.json only for deepseek_v4
_V4_KEYS = ("head_dim", "layer_types", "mlp_layer_types", "compress_rates", "compress_rope_theta", "sliding_window",
            "hc_mult", "hc_sinkhorn_iters", "hc_eps", "o_groups", "o_lora_rank", "swiglu_limit")
# MLA / V3-routing keys V4 has no use for
_NOT_V4_KEYS = ("intermediate_size", "n_group", "topk_group", "topk_method", "first_k_dense_replace",
                "moe_layer_freq", "kv_lora_rank", "qk_nope_head_dim", "v_head_dim", "rope_interleave", "aux_loss_alpha",
                "seq_aux") + _DYNAMIC_ROUTING_KEYS
_NULLABLE = {"q_lora_rank", "pad_token_id", "bos_token_id", "eos_token_id", "num_key_value_heads"}
_ARCHITECTURES = {"deepseek_v2": "DeepseekV2ForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM",
                  "deepseek_v32": "DeepseekV32ForCausalLM", "deepseek_v4": "DeepseekV4ForCausalLM"}
_INDEXER_KEYS = ("index_n_heads", "index_head_dim", "index_topk")


@dataclass
class ModelConfig:
    model_type: str = "deepseek_v3"
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int | None = None  # nominal for MLA; kept for transformers
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    num_experts_per_tok: int = 8
    routed_scaling_factor: float = 2.5
    n_group: int = 8
    topk_group: int = 4
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    first_k_dense_replace: int = 3
    moe_layer_freq: int = 1
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 163840
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # None = plain RoPE; else {"type": "yarn", "factor", "original_max_position_embeddings",
    # "beta_fast", "beta_slow", "mscale", "mscale_all_dim", ...} (HF's rope_scaling, legacy spelling)
    rope_scaling: dict | None = None
    rope_interleave: bool = True
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    initializer_range: float = 0.02
    aux_loss_alpha: float = 0.0001
    seq_aux: bool = True
    # Dynamic sparsity (openr2's, not a DeepSeek release's; model/moe.py): with routing_top_p > 0 each token
    # keeps the fewest of its num_experts_per_tok candidates (best gate first) whose normalised gates reach
    # routing_top_p, at least routing_min_k of them; training adds routing_compute_penalty times a smooth
    # count of the experts kept beyond the first. 0 = fixed top-k. Written to config.json only when on.
    routing_top_p: float = 0.0
    routing_min_k: int = 1
    routing_compute_penalty: float = 0.0
    # DeepSeek Sparse Attention (deepseek_v32 only; None otherwise): the lightning indexer's heads and head
    # dim, and how many keys each query keeps
    index_n_heads: int | None = None
    index_head_dim: int | None = None
    index_topk: int | None = None
    # DeepSeek-V4 (deepseek_v4 only; None otherwise): see the module docstring
    head_dim: int | None = None
    layer_types: list | None = None
    mlp_layer_types: list | None = None
    compress_rates: dict | None = None
    compress_rope_theta: float | None = None
    sliding_window: int | None = None
    hc_mult: int | None = None
    hc_sinkhorn_iters: int | None = None
    hc_eps: float | None = None
    o_groups: int | None = None
    o_lora_rank: int | None = None
    swiglu_limit: float | None = None
    # FP8 block format of the stored weights ({quant_method: fp8, weight_block_size: [128, 128]}), or None
    quantization_config: dict | None = None
    torch_dtype: str | None = None
    source: str = field(default="<memory>", repr=False, compare=False)  # where it was read from, for errors

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads

    # ------------------------------------------------------------------ derived values
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def is_v3(self) -> bool:
        return self.model_type == "deepseek_v3"

    @property
    def is_v4(self) -> bool:
        """DeepSeek-V4: per-layer attention kinds over one shared KV head, hyper-connections, hash routing."""
        return self.model_type == "deepseek_v4"

    def compress_rate(self, layer_idx: int) -> int:
        """V4: tokens per compressed entry of a layer (0 for a sliding-window layer)."""
        kind = self.layer_types[layer_idx]
        return 0 if kind == "sliding_attention" else self.compress_rates[kind]

    @property
    def has_indexer(self) -> bool:
        """DeepSeek Sparse Attention: a lightning indexer in every attention layer (V3.2)."""
        return self.model_type == "deepseek_v32"

    def is_moe_layer(self, layer_idx: int) -> bool:
        """DeepSeek's rule: dense for the first `first_k_dense_replace` layers, then MoE every `moe_layer_freq`
        (V4: every layer)."""
        if self.is_v4:
            return True
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    @property
    def softmax_scale(self) -> float:
        """1/sqrt(qk_head_dim), times mscale(factor, mscale_all_dim)^2 under YaRN (as HF and vLLM do)."""
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs and rs.get("mscale_all_dim"):
            m = yarn_mscale(rs["factor"], rs["mscale_all_dim"])
            scale *= m * m
        return scale

    # ------------------------------------------------------------------ HF config.json
    @classmethod
    def from_hf(cls, hf: dict, source: str = "<dict>") -> ModelConfig:
        """Build from a parsed HF config.json dict. Unknown keys are ignored; bad values raise ValueError."""
        if not isinstance(hf, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(hf).__name__}")
        model_type = hf.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ValueError(f"{source}: key 'model_type' is {model_type!r}; openr2 reads {', '.join(MODEL_TYPES)}")
        defaults = _defaults_for(model_type)
        names = {f.name for f in dataclasses.fields(cls)} - {"source", "rope_scaling", "rope_theta"}
        if model_type not in ("deepseek_v32", "deepseek_v4"):
            names -= set(_INDEXER_KEYS)  # only V3.2 and V4 have indexers; stray keys elsewhere mean nothing
        if model_type == "deepseek_v4":
            names -= set(_NOT_V4_KEYS)
        else:
            names -= set(_V4_KEYS)
        kwargs: dict[str, Any] = {k: hf[k] for k in names if k in hf and (hf[k] is not None or k in _NULLABLE)}
        if "num_nextn_predict_layers" not in hf and "num_mtp_layers" in hf:  # transformers 5.x alias
            kwargs["num_nextn_predict_layers"] = hf["num_mtp_layers"]
        if model_type == "deepseek_v4":
            kwargs.update(_read_v4(hf, source, defaults))
        else:
            kwargs["rope_theta"], kwargs["rope_scaling"] = _read_rope(hf, source)
        if "torch_dtype" not in kwargs and isinstance(hf.get("dtype"), str):
            kwargs["torch_dtype"] = hf["dtype"]
        cfg = dataclasses.replace(defaults, **kwargs, source=source)
        cfg.validate()
        if cfg.has_indexer:
            _check_mlp_layer_types(cfg, hf.get("mlp_layer_types"))
        return cfg

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> ModelConfig:
        """Read `config.json` from a checkpoint directory (or the file itself)."""
        path = os.fspath(path)
        file = os.path.join(path, "config.json") if os.path.isdir(path) else path
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file}: no such config file")
        try:
            with open(file, encoding="utf-8") as f:
                hf = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{file}: not valid JSON ({e})") from None
        return cls.from_hf(hf, source=file)

    def to_hf(self) -> dict:
        """A config.json dict that transformers (5.x, and older tooling via the legacy keys) loads."""
        out: dict[str, Any] = {"architectures": [_ARCHITECTURES[self.model_type]]}
        for f in dataclasses.fields(self):
            if f.name in ("source", "rope_scaling", "torch_dtype", "quantization_config"):
                continue
            if f.name in _INDEXER_KEYS and not (self.has_indexer or self.is_v4):
                continue
            if f.name in (_NOT_V4_KEYS if self.is_v4 else _V4_KEYS):
                continue
            if f.name in _DYNAMIC_ROUTING_KEYS and not self.routing_top_p:
                continue
            out[f.name] = getattr(self, f.name)
        if self.is_v4:
            return self._to_hf_v4(out)
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope = {**{k: v for k, v in self.rope_scaling.items() if k != "type"}, "rope_type": "yarn",
                    "rope_theta": self.rope_theta}
        out["rope_parameters"] = rope
        if self.is_v3:
            out["num_mtp_layers"] = self.num_nextn_predict_layers  # transformers 5.x name; defaults to 1 if absent
        if self.torch_dtype:
            out["dtype"] = self.torch_dtype
        return out

    def _to_hf_v4(self, out: dict) -> dict:
        """transformers' DeepseekV4Config keys: both rope tables nested by kind, partial rotary as a factor."""
        out.pop("rope_theta", None)
        out.pop("qk_rope_head_dim")
        factor = self.qk_rope_head_dim / self.head_dim
        compress = {"rope_type": "default", "rope_theta": self.compress_rope_theta, "partial_rotary_factor": factor}
        if self.rope_scaling:
            compress = {**{k: v for k, v in self.rope_scaling.items() if k != "type"}, **compress,
                        "rope_type": "yarn", "attention_factor": 1.0}
        out["rope_theta"] = self.rope_theta
        out["partial_rotary_factor"] = factor
        out["num_key_value_heads"] = 1
        out["rope_parameters"] = {"main": {"rope_type": "default", "rope_theta": self.rope_theta,
                                           "partial_rotary_factor": factor}, "compress": compress}
        if self.torch_dtype:
            out["dtype"] = self.torch_dtype
        return out

    def save_pretrained(self, path: str | os.PathLike) -> None:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
            json.dump(self.to_hf(), f, indent=2, sort_keys=True)
            f.write("\n")

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        def bad(key: str, why: str) -> ValueError:
            return ValueError(f"{self.source}: key '{key}' {why} (got {getattr(self, key, None)!r})")

        if self.is_v4:
            return self._validate_v4(bad)
        positive = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings"]
        for key in positive:
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise bad(key, "must be a positive integer")
        for key in ["intermediate_size", "moe_intermediate_size", "n_shared_experts", "n_routed_experts",
                    "first_k_dense_replace", "num_nextn_predict_layers"]:
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise bad(key, "must be a non-negative integer")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            raise bad("q_lora_rank", "must be a positive integer or null")
        if self.qk_rope_head_dim % 2:
            raise bad("qk_rope_head_dim", "must be even (RoPE rotates pairs)")
        if self.hidden_act != "silu":
            raise bad("hidden_act", "must be 'silu'")
        if not (isinstance(self.rms_norm_eps, (int, float)) and self.rms_norm_eps > 0):
            raise bad("rms_norm_eps", "must be > 0")
        if not (isinstance(self.rope_theta, (int, float)) and self.rope_theta > 1):
            raise bad("rope_theta", "must be > 1")
        if self.first_k_dense_replace < self.num_hidden_layers and self.intermediate_size == 0 and \
                self.first_k_dense_replace > 0:
            raise bad("intermediate_size", "must be > 0 when there are dense layers")
        if not isinstance(self.moe_layer_freq, int) or self.moe_layer_freq < 1:
            raise bad("moe_layer_freq", "must be an integer >= 1")
        has_moe = any(self.is_moe_layer(i) for i in range(self.num_hidden_layers)) or self.num_nextn_predict_layers
        if has_moe and self.n_routed_experts > 0:
            self._validate_routing(bad)
        if self.has_indexer:
            self._validate_indexer(bad)

    def _validate_v4(self, bad) -> None:
        def positive_int(key):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise bad(key, "must be a positive integer")

        for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                    "qk_rope_head_dim", "max_position_embeddings", "moe_intermediate_size", "n_routed_experts",
                    "num_experts_per_tok", "sliding_window", "hc_mult", "hc_sinkhorn_iters", "o_groups",
                    "o_lora_rank", "q_lora_rank"):
            positive_int(key)
        if self.qk_rope_head_dim % 2 or self.qk_rope_head_dim > self.head_dim:
            raise bad("qk_rope_head_dim", f"must be even and <= head_dim ({self.head_dim})")
        if self.num_attention_heads % self.o_groups:
            raise bad("o_groups", f"must divide num_attention_heads ({self.num_attention_heads})")
        n = self.num_hidden_layers
        for key, allowed in (("layer_types", V4_LAYER_TYPES), ("mlp_layer_types", V4_MLP_LAYER_TYPES)):
            types = getattr(self, key)
            if not isinstance(types, list) or len(types) != n or any(t not in allowed for t in types):
                raise bad(key, f"must list one of {allowed} for each of the {n} layers")
        rates = self.compress_rates
        if not isinstance(rates, dict) or any(not isinstance(rates.get(k), int) or rates[k] <= 0
                                              for k in V4_LAYER_TYPES[1:]):
            raise bad("compress_rates", f"must map {V4_LAYER_TYPES[1:]} to positive integers")
        if self.num_experts_per_tok > self.n_routed_experts:
            raise bad("num_experts_per_tok", f"must be in 1..n_routed_experts ({self.n_routed_experts})")
        if self.scoring_func not in ("sqrtsoftplus", "sigmoid"):
            raise bad("scoring_func", "must be 'sqrtsoftplus' or 'sigmoid' for deepseek_v4")
        if self.hidden_act != "silu":
            raise bad("hidden_act", "must be 'silu'")
        for key in ("rms_norm_eps", "hc_eps", "swiglu_limit"):
            v = getattr(self, key)
            if not (isinstance(v, (int, float)) and v > 0):
                raise bad(key, "must be > 0")
        if "compressed_sparse_attention" in self.layer_types:
            for key in _INDEXER_KEYS:
                positive_int(key)
            if self.index_head_dim < self.qk_rope_head_dim:
                raise bad("index_head_dim", f"must be >= qk_rope_head_dim ({self.qk_rope_head_dim})")

    def _validate_indexer(self, bad) -> None:
        """V3.2: the indexer's sizes, and what transformers' DeepseekV32 modules fix whatever the config says."""
        for key in _INDEXER_KEYS:
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise bad(key, "must be a positive integer")
        if self.index_head_dim < self.qk_rope_head_dim:
            raise bad("index_head_dim", f"must be >= qk_rope_head_dim ({self.qk_rope_head_dim}): the indexer "
                                        f"rotates its first qk_rope_head_dim dims")
        if self.q_lora_rank is None:
            raise bad("q_lora_rank", "must be set for deepseek_v32 (the indexer's query reads the q latent)")
        if not self.rope_interleave:
            raise bad("rope_interleave", "must be true for deepseek_v32 (its MLA rope is always interleaved)")
        if self.moe_layer_freq != 1:
            raise bad("moe_layer_freq", "must be 1 for deepseek_v32 (every layer after the dense ones is MoE)")
        if self.n_routed_experts > 0 and self.topk_method != "noaux_tc":
            raise bad("topk_method", "must be 'noaux_tc' for deepseek_v32 (sigmoid gates with a correction bias)")

    def _validate_routing(self, bad) -> None:
        if self.moe_intermediate_size <= 0:
            raise bad("moe_intermediate_size", "must be > 0 for MoE layers")
        if self.topk_method not in ROUTING_METHODS:
            raise bad("topk_method", f"must be one of {sorted(ROUTING_METHODS)}")
        if self.scoring_func != ROUTING_METHODS[self.topk_method]:
            raise bad("scoring_func", f"must be {ROUTING_METHODS[self.topk_method]!r} with topk_method "
                                      f"{self.topk_method!r}")
        if not (isinstance(self.num_experts_per_tok, int) and 0 < self.num_experts_per_tok <= self.n_routed_experts):
            raise bad("num_experts_per_tok", f"must be in 1..n_routed_experts ({self.n_routed_experts})")
        if not (isinstance(self.routing_top_p, (int, float)) and 0 <= self.routing_top_p <= 1):
            raise bad("routing_top_p", "must be in [0, 1] (0: fixed top-k)")
        if not (isinstance(self.routing_min_k, int) and 1 <= self.routing_min_k <= self.num_experts_per_tok):
            raise bad("routing_min_k", f"must be in 1..num_experts_per_tok ({self.num_experts_per_tok})")
        if not (isinstance(self.routing_compute_penalty, (int, float)) and self.routing_compute_penalty >= 0):
            raise bad("routing_compute_penalty", "must be >= 0")
        if self.topk_method == "greedy":
            return
        if not (isinstance(self.n_group, int) and self.n_group > 0 and self.n_routed_experts % self.n_group == 0):
            raise bad("n_group", f"must divide n_routed_experts ({self.n_routed_experts})")
        if not (isinstance(self.topk_group, int) and 0 < self.topk_group <= self.n_group):
            raise bad("topk_group", f"must be in 1..n_group ({self.n_group})")
        per_group = self.n_routed_experts // self.n_group
        if self.topk_method == "noaux_tc" and per_group < 2:
            raise bad("n_group", "leaves fewer than 2 experts per group (noaux_tc scores groups by their top-2)")
        if self.topk_group * per_group < self.num_experts_per_tok:
            raise bad("topk_group", "keeps fewer experts than num_experts_per_tok")


def _check_mlp_layer_types(cfg: ModelConfig, types) -> None:
    """transformers' V3.2 picks dense or MoE per layer from `mlp_layer_types` (written by its saves; derived
    from first_k_dense_replace when absent); openr2 derives it, so a list that says otherwise is refused."""
    if types is None:
        return
    want = ["sparse" if cfg.is_moe_layer(i) else "dense" for i in range(cfg.num_hidden_layers)]
    if list(types) != want:
        raise ValueError(f"{cfg.source}: key 'mlp_layer_types' is {types!r}; openr2 derives {want} from "
                         f"first_k_dense_replace ({cfg.first_k_dense_replace}) and n_routed_experts")


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention-temperature correction 0.1 * mscale * ln(factor) + 1 (1 when not extending)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _defaults_for(model_type: str) -> ModelConfig:
    if model_type == "deepseek_v4":  # transformers' DeepseekV4Config defaults (those of V4-Flash's dimensions)
        return ModelConfig(
            model_type=model_type, vocab_size=129280, hidden_size=4096, moe_intermediate_size=2048,
            num_hidden_layers=43, num_attention_heads=64, num_key_value_heads=1, head_dim=512, qk_rope_head_dim=64,
            q_lora_rank=1024, num_experts_per_tok=6, n_routed_experts=256, n_shared_experts=1,
            scoring_func="sqrtsoftplus", norm_topk_prob=True, routed_scaling_factor=1.5,
            max_position_embeddings=1048576, rope_theta=10000.0, rope_scaling=None, compress_rope_theta=160000.0,
            compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 128}, hc_mult=4,
            hc_sinkhorn_iters=20, hc_eps=1e-6, swiglu_limit=10.0, sliding_window=128, o_groups=8, o_lora_rank=1024,
            index_n_heads=64, index_head_dim=128, index_topk=512, num_nextn_predict_layers=1, rms_norm_eps=1e-6,
            bos_token_id=0, eos_token_id=1, topk_method="noaux_tc")
    if model_type == "deepseek_v3":
        return ModelConfig(model_type=model_type, rope_scaling=None)
    if model_type == "deepseek_v32":  # transformers' DeepseekV32Config defaults: V3's plus the indexer's
        return ModelConfig(model_type=model_type, rope_scaling=None, index_n_heads=64, index_head_dim=128,
                           index_topk=2048)
    # transformers' DeepseekV2Config defaults, with the V2-family routing fields
    return ModelConfig(
        model_type=model_type, vocab_size=102400, hidden_size=4096, intermediate_size=11008,
        moe_intermediate_size=1407, num_hidden_layers=32, num_attention_heads=32, n_shared_experts=2,
        n_routed_experts=64, num_experts_per_tok=6, routed_scaling_factor=1.0, n_group=1, topk_group=1,
        topk_method="greedy", scoring_func="softmax", norm_topk_prob=False, first_k_dense_replace=0,
        q_lora_rank=1536, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, aux_loss_alpha=0.001,
    )


_YARN_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim",
              "attention_factor", "truncate")


def _read_rope(hf: dict, source: str) -> tuple[float, dict | None]:
    """(rope_theta, yarn dict or None) from `rope_parameters` (transformers 5.x) or legacy `rope_scaling`."""
    params = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    if not isinstance(params, dict):
        raise ValueError(f"{source}: key '{key}' must be an object")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "yarn":
        raise ValueError(f"{source}: key '{key}.rope_type' is {kind!r}; openr2 supports 'default' and 'yarn'")
    yarn = {"type": "yarn", **{k: params[k] for k in _YARN_KEYS if params.get(k) is not None}}
    yarn.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings", 4096))
    factor = yarn.get("factor")
    if factor is None:  # transformers derives it from the context extension
        factor = hf.get("max_position_embeddings", 4096) / yarn["original_max_position_embeddings"]
    if not isinstance(factor, (int, float)) or factor <= 0:
        raise ValueError(f"{source}: key '{key}.factor' must be a positive number (got {factor!r})")
    yarn["factor"] = factor
    return theta, yarn


def _read_v4(hf: dict, source: str, defaults: ModelConfig) -> dict[str, Any]:
    """V4's derived keys, as transformers' DeepseekV4Config.__post_init__ derives them: `compress_rates`
    (or the legacy `compress_rate_csa` / `_hca`), `layer_types` (or the release's `compress_ratios` per layer,
    the MTP layer's trailing entry dropped; else transformers' default schedule), `mlp_layer_types` (or
    `num_hash_layers`, default 3), partial rotary (`partial_rotary_factor` or the release's
    `qk_rope_head_dim`) and the two rope tables (nested `rope_parameters` or flat keys)."""
    out: dict[str, Any] = {}
    n = hf.get("num_hidden_layers", defaults.num_hidden_layers)
    rates = dict(hf.get("compress_rates") or defaults.compress_rates)
    for legacy, kind in (("compress_rate_csa", V4_LAYER_TYPES[1]), ("compress_rate_hca", V4_LAYER_TYPES[2])):
        if hf.get(legacy) is not None:
            rates[kind] = hf[legacy]
    out["compress_rates"] = rates
    types = hf.get("layer_types")
    if types is None and hf.get("compress_ratios") is not None:
        try:
            types = [_V4_RATIO_TO_LAYER_TYPE[r] for r in hf["compress_ratios"]]
        except (KeyError, TypeError):
            raise ValueError(f"{source}: key 'compress_ratios' must hold 0, 4 or 128 per layer "
                             f"(got {hf['compress_ratios']!r})") from None
    if types is None:  # transformers' default: two HCA layers, then HCA at even and CSA at odd indices
        types = [V4_LAYER_TYPES[2]] * min(n, 2) + [V4_LAYER_TYPES[1 + (i % 2 == 0)] for i in range(max(n - 2, 0))]
    out["layer_types"] = list(types)[:n]
    mlp = hf.get("mlp_layer_types")
    if mlp is None:
        n_hash = hf.get("num_hash_layers", 3)
        mlp = ["hash_moe"] * min(n, n_hash) + ["moe"] * max(0, n - n_hash)
    out["mlp_layer_types"] = list(mlp)[:n]
    head_dim = hf.get("head_dim", defaults.head_dim)
    if hf.get("partial_rotary_factor") is not None:
        out["qk_rope_head_dim"] = int(head_dim * hf["partial_rotary_factor"])
    elif hf.get("qk_rope_head_dim") is not None:
        out["qk_rope_head_dim"] = hf["qk_rope_head_dim"]
    params = hf.get("rope_parameters") or {}
    if isinstance(params.get("main"), dict) and isinstance(params.get("compress"), dict):
        out["rope_theta"] = params["main"].get("rope_theta", hf.get("rope_theta", defaults.rope_theta))
        compress = params["compress"]
        out["compress_rope_theta"] = compress.get("rope_theta", hf.get("compress_rope_theta",
                                                                       defaults.compress_rope_theta))
        if compress.get("rope_type", compress.get("type", "default")) == "default":
            out["rope_scaling"] = None
        else:
            _, out["rope_scaling"] = _read_rope({**hf, "rope_parameters": compress}, source)
    else:  # flat keys: rope_theta for the main table, rope_scaling (or flat rope_parameters) for the compressed
        out["rope_theta"] = hf.get("rope_theta", defaults.rope_theta)
        out["compress_rope_theta"] = hf.get("compress_rope_theta", defaults.compress_rope_theta)
        flat = {k: v for k, v in hf.items() if k not in ("rope_parameters", "rope_theta")}
        if params:
            flat["rope_parameters"] = params
        _, out["rope_scaling"] = _read_rope(flat, source)
    if out["rope_scaling"] is not None:
        out["rope_scaling"].pop("attention_factor", None)  # V4's compressed rope has none (1.0), always
    return out
