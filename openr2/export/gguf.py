"""GGUF export for llama.cpp / Ollama (architecture `deepseek2`), written with the `gguf` package alone.

Owns the checkpoint -> GGUF mapping (metadata keys, tensor names, kv_b split, expert stacking, per-tensor
types) and its inverse for tests (`gguf_state_dict`: numpy-dequantized GGUF tensors in our layout).
It does not know HF names (checkpoints.load_model loads the checkpoint) or tokenizer internals (gguf_vocab.py).

The pitfalls that silently ruin accuracy (../shared/reference/quant_longctx.md §1.9) are handled here:
`expert_gating_func` is always written (llama.cpp falls back to softmax without it); q_lora_rank is
written (0 for a plain q_proj: llama.cpp requires the key except for a few "lite" layer counts); YaRN keys
are copied, with the log multiplier stored as 0.1 * mscale_all_dim (llama.cpp divides by 0.1); the
pre-tokenizer name is derived from our regexes; general.name is explicit. Whatever llama.cpp's graph
cannot reproduce (other MoE spacing, biases, neox RoPE, V2 group-limited greedy routing, ...) is an
error before any file is written, and the file appears under its name only once complete.

Shape legend: V vocab, D hidden, H heads, C kv_lora_rank, N qk_nope_head_dim, R rope dim, E experts.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np
import torch

from openr2.config import ModelConfig
from openr2.export.gguf_vocab import vocab_metadata, write_vocab

ARCH = "deepseek2"
EXPORT_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")


def _gguf():
    import gguf  # the runtime dependency; imported on use so `openr2 --help` stays instant

    return gguf


# ---------------------------------------------------------------------------------------------- checks
def check_exportable(config: ModelConfig, source: str) -> None:
    """Raise ValueError for anything llama.cpp's deepseek2 graph would run differently from our model."""
    def bad(why: str) -> ValueError:
        return ValueError(f"{source}: cannot export to GGUF ({ARCH}): {why}")

    qc = config.quantization_config or {}
    if qc.get("quant_method") not in (None, "fp8"):
        raise bad(f"the checkpoint is quantized ({qc}); export its float checkpoint (re-quantizing int weights "
                  f"would compound the error)")
    if config.is_v4:
        raise bad("deepseek_v4 (DeepSeek-V4: compressed attention, hyper-connections): llama.cpp's deepseek2 "
                  "graph has none of them")
    if config.has_indexer:
        raise bad("deepseek_v32 (DeepSeek-V3.2 sparse attention): the deepseek2 graph has no lightning indexer "
                  "and would attend to every key")
    if config.moe_layer_freq != 1:
        raise bad(f"moe_layer_freq {config.moe_layer_freq}: llama.cpp makes every layer after the leading dense ones MoE")
    if config.attention_bias:
        raise bad("attention_bias: llama.cpp's deepseek2 has no attention biases")
    if not config.rope_interleave:
        raise bad("rope_interleave false: llama.cpp's deepseek2 rotates interleaved pairs")
    has_moe = config.n_routed_experts > 0 and config.first_k_dense_replace < config.num_hidden_layers
    if has_moe and config.routing_top_p:
        raise bad(f"dynamic sparsity (routing_top_p {config.routing_top_p}: a variable number of experts per "
                  f"token, {config.routing_min_k}..{config.num_experts_per_tok}): llama.cpp's deepseek2 runs "
                  f"exactly n_expert_used = {config.num_experts_per_tok} experts for every token, so it would "
                  "compute another model")
    if has_moe and config.n_shared_experts < 1:
        raise bad("no shared expert: llama.cpp's deepseek2 requires one")
    if has_moe and config.topk_method == "group_limited_greedy" and config.topk_group < config.n_group:
        raise bad("group_limited_greedy routing (a group scores its best expert); llama.cpp scores groups by "
                  "their top-2 sum (V3's rule)")
    rs = config.rope_scaling
    if rs:
        if rs.get("attention_factor") is not None or (rs.get("mscale") or 1.0) != (rs.get("mscale_all_dim") or 1.0):
            raise bad("YaRN with mscale != mscale_all_dim or an explicit attention_factor")
        if rs.get("truncate", True) is False:
            raise bad("YaRN with truncate false (llama.cpp rounds the correction range)")


# ---------------------------------------------------------------------------------------------- tensors
def gguf_tensors(model) -> list[tuple[str, torch.Tensor]]:
    """(GGUF name, float tensor in numpy order [out, in]) for every tensor llama.cpp reads, MTP skipped."""
    c = model.config
    H, N, V = c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim
    out = [("token_embd.weight", model.embed_tokens.weight), ("output_norm.weight", model.norm.weight)]
    if not c.tie_word_embeddings:
        out.append(("output.weight", model.lm_head.weight))
    for i, layer in enumerate(model.layers):
        b, a = f"blk.{i}.", layer.self_attn
        out += [(b + "attn_norm.weight", layer.input_layernorm.weight),
                (b + "ffn_norm.weight", layer.post_attention_layernorm.weight)]
        if c.q_lora_rank is None:
            out.append((b + "attn_q.weight", a.q_proj.weight))
        else:
            out += [(b + "attn_q_a.weight", a.q_a_proj.weight), (b + "attn_q_a_norm.weight", a.q_a_layernorm.weight),
                    (b + "attn_q_b.weight", a.q_b_proj.weight)]
        kv_b = a.kv_b_proj.weight.view(H, N + V, c.kv_lora_rank)
        out += [(b + "attn_kv_a_mqa.weight", a.kv_a_proj_with_mqa.weight),
                (b + "attn_kv_a_norm.weight", a.kv_a_layernorm.weight),
                (b + "attn_k_b.weight", kv_b[:, :N].transpose(1, 2)),  # [H, C, N]: q_nope -> latent query
                (b + "attn_v_b.weight", kv_b[:, N:]),  # [H, V, C]: latent output -> per-head values
                (b + "attn_output.weight", a.o_proj.weight)]
        mlp = layer.mlp
        if c.is_moe_layer(i):
            I = c.moe_intermediate_size
            out.append((b + "ffn_gate_inp.weight", mlp.gate.weight))
            if hasattr(mlp.gate, "e_score_correction_bias"):
                out.append((b + "exp_probs_b.bias", mlp.gate.e_score_correction_bias))
            out += [(b + "ffn_gate_exps.weight", mlp.experts.gate_up_proj[:, :I]),  # [E, I, D]
                    (b + "ffn_up_exps.weight", mlp.experts.gate_up_proj[:, I:]),
                    (b + "ffn_down_exps.weight", mlp.experts.down_proj),  # [E, D, I]
                    (b + "ffn_gate_shexp.weight", mlp.shared_experts.gate_proj.weight),
                    (b + "ffn_up_shexp.weight", mlp.shared_experts.up_proj.weight),
                    (b + "ffn_down_shexp.weight", mlp.shared_experts.down_proj.weight)]
        else:
            out += [(b + "ffn_gate.weight", mlp.gate_proj.weight), (b + "ffn_up.weight", mlp.up_proj.weight),
                    (b + "ffn_down.weight", mlp.down_proj.weight)]
    return [(name, t.detach().float().contiguous()) for name, t in out]


_KEEP_F32 = ("ffn_gate_inp.weight",)  # the router: MoE choices flip on tiny errors (llama.cpp keeps it F32)


def tensor_type(name: str, shape: tuple[int, ...], export_type: str):
    """The GGML type a tensor gets: 1-D and router F32; Q8_0/Q4_0 need rows of a multiple of 32 (else F16,
    as llama.cpp's converter falls back); with q4_0 the output head is Q8_0."""
    T = _gguf().GGMLQuantizationType
    if export_type == "f32" or len(shape) == 1 or name.endswith(_KEEP_F32):
        return T.F32
    if export_type in ("q8_0", "q4_0") and shape[-1] % 32:
        return T.F16
    if export_type == "q4_0" and name == "output.weight":
        return T.Q8_0
    return {"f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_0": T.Q4_0}[export_type]


# ---------------------------------------------------------------------------------------------- metadata
def write_metadata(w, c: ModelConfig, name: str, export_type: str) -> None:
    g = _gguf()
    w.add_name(name)
    w.add_file_type({"f32": g.LlamaFileType.ALL_F32, "f16": g.LlamaFileType.MOSTLY_F16,
                     "bf16": g.LlamaFileType.MOSTLY_BF16, "q8_0": g.LlamaFileType.MOSTLY_Q8_0,
                     "q4_0": g.LlamaFileType.MOSTLY_Q4_0}[export_type])
    w.add_quantization_version(g.GGML_QUANT_VERSION)
    w.add_vocab_size(c.vocab_size)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(1)  # MLA runs as MQA over the latent
    w.add_key_length(c.kv_lora_rank + c.qk_rope_head_dim)
    w.add_value_length(c.kv_lora_rank)
    w.add_key_length_mla(c.qk_head_dim)
    w.add_value_length_mla(c.v_head_dim)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.qk_rope_head_dim)
    w.add_rope_freq_base(float(c.rope_theta))
    w.add_q_lora_rank(c.q_lora_rank or 0)  # required unless n_layer is a "lite" count; 0 = plain attn_q
    w.add_kv_lora_rank(c.kv_lora_rank)
    moe = c.n_routed_experts > 0 and c.first_k_dense_replace < c.num_hidden_layers
    w.add_leading_dense_block_count(min(c.first_k_dense_replace, c.num_hidden_layers) if moe else c.num_hidden_layers)
    w.add_expert_count(c.n_routed_experts if moe else 0)
    w.add_expert_used_count(c.num_experts_per_tok if moe else 0)
    w.add_expert_shared_count(c.n_shared_experts if moe else 0)
    w.add_expert_feed_forward_length(c.moe_intermediate_size)
    grouped = moe and c.topk_method != "greedy" and c.topk_group < c.n_group
    w.add_expert_group_count(c.n_group if grouped else 1)
    w.add_expert_group_used_count(c.topk_group if grouped else 1)
    w.add_expert_weights_scale(float(c.routed_scaling_factor))
    w.add_expert_weights_norm(bool(c.norm_topk_prob))
    w.add_expert_gating_func(g.ExpertGatingFuncType.SIGMOID if c.scoring_func == "sigmoid"
                             else g.ExpertGatingFuncType.SOFTMAX)
    rs = c.rope_scaling
    if rs:
        w.add_rope_scaling_type(g.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(rs["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(rs["original_max_position_embeddings"]))
        w.add_rope_scaling_yarn_beta_fast(float(rs.get("beta_fast") or 32))
        w.add_rope_scaling_yarn_beta_slow(float(rs.get("beta_slow") or 1))
        # a legacy quirk: llama.cpp divides this value by 0.1 on load ([TAG_DEEPSEEK2_YARN_LOG_MUL_FIX])
        w.add_rope_scaling_yarn_log_mul(0.1 * float(rs.get("mscale_all_dim") or 0.0))


# ---------------------------------------------------------------------------------------------- export
def export_gguf(model_dir: str, out: str, export_type: str = "f16", name: str | None = None,
                pre_tokenizer: str | None = None) -> dict:
    """Write `model_dir` (an HF-layout float or FP8 checkpoint with tokenizer.json) as a GGUF file."""
    from openr2.checkpoints import load_model

    model_dir, out = os.fspath(model_dir), os.fspath(out)
    if export_type not in EXPORT_TYPES:
        raise ValueError(f"unknown GGUF type {export_type!r}; choose one of {', '.join(EXPORT_TYPES)}")
    if os.path.isdir(out):
        raise ValueError(f"{out}: is a directory; give the output file name (e.g. model.gguf)")
    config = ModelConfig.from_pretrained(model_dir)
    check_exportable(config, os.path.join(model_dir, "config.json"))
    vocab = vocab_metadata(model_dir, config.vocab_size, pre_tokenizer)
    model = load_model(model_dir)
    name = name or os.path.basename(os.path.normpath(model_dir))
    g = _gguf()
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".export-", suffix=".gguf", dir=parent)
    os.close(fd)
    counts: dict[str, int] = {}
    try:
        writer = g.GGUFWriter(tmp, ARCH)
        write_metadata(writer, model.config, name, export_type)
        write_vocab(writer, vocab)
        for tname, tensor in gguf_tensors(model):
            array = tensor.numpy()
            qtype = tensor_type(tname, array.shape, export_type)
            data = g.quants.quantize(array, qtype)
            if qtype in (g.GGMLQuantizationType.F32, g.GGMLQuantizationType.F16):
                writer.add_tensor(tname, data)
            else:  # the uint8 bytes; no raw_shape (that would be the byte shape)
                writer.add_tensor(tname, data, raw_dtype=qtype)
            counts[qtype.name] = counts.get(qtype.name, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return {"out": out, "type": export_type, "name": name, "pre_tokenizer": vocab["pre"],
            "bytes": os.path.getsize(out), "tensor_types": counts}


# ---------------------------------------------------------------------------------------------- inverse
def gguf_state_dict(path: str, config: ModelConfig) -> dict[str, torch.Tensor]:
    """Read a GGUF file back into our state-dict names, dequantized with numpy (a test of the mapping:
    loading it into Transformer(config) must reproduce the exported model up to the GGUF types' rounding)."""
    g = _gguf()
    reader = g.GGUFReader(path)
    raw = {}
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dims innermost first
        raw[t.name] = torch.from_numpy(np.array(g.quants.dequantize(t.data, t.tensor_type)).reshape(shape).copy())
    c = config
    H, N, V, C = c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim, c.kv_lora_rank
    state = {"embed_tokens.weight": raw["token_embd.weight"], "norm.weight": raw["output_norm.weight"],
             "lm_head.weight": raw.get("output.weight", raw["token_embd.weight"])}
    for i in range(c.num_hidden_layers):
        b, o = f"blk.{i}.", f"layers.{i}."
        names = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
                 "self_attn.kv_a_proj_with_mqa.weight": "attn_kv_a_mqa.weight",
                 "self_attn.kv_a_layernorm.weight": "attn_kv_a_norm.weight", "self_attn.o_proj.weight": "attn_output.weight"}
        if c.q_lora_rank is None:
            names["self_attn.q_proj.weight"] = "attn_q.weight"
        else:
            names.update({"self_attn.q_a_proj.weight": "attn_q_a.weight", "self_attn.q_b_proj.weight": "attn_q_b.weight",
                          "self_attn.q_a_layernorm.weight": "attn_q_a_norm.weight"})
        if c.is_moe_layer(i):
            names.update({"mlp.gate.weight": "ffn_gate_inp.weight", "mlp.experts.down_proj": "ffn_down_exps.weight",
                          "mlp.shared_experts.gate_proj.weight": "ffn_gate_shexp.weight",
                          "mlp.shared_experts.up_proj.weight": "ffn_up_shexp.weight",
                          "mlp.shared_experts.down_proj.weight": "ffn_down_shexp.weight"})
            if b + "exp_probs_b.bias" in raw:
                names["mlp.gate.e_score_correction_bias"] = "exp_probs_b.bias"
            state[o + "mlp.experts.gate_up_proj"] = torch.cat((raw[b + "ffn_gate_exps.weight"],
                                                               raw[b + "ffn_up_exps.weight"]), dim=1)
        else:
            names.update({f"mlp.{p}.weight": f"ffn_{p.split('_')[0]}.weight" for p in ("gate_proj", "up_proj", "down_proj")})
        state.update({o + ours: raw[b + theirs] for ours, theirs in names.items()})
        k_b, v_b = raw[b + "attn_k_b.weight"], raw[b + "attn_v_b.weight"]  # [H, C, N], [H, V, C]
        state[o + "self_attn.kv_b_proj.weight"] = torch.cat((k_b.transpose(1, 2), v_b), dim=1).reshape(H * (N + V), C)
    return state
