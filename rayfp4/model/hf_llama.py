"""The transformer as a Hugging Face ``LlamaForCausalLM``: its ``config.json`` and weight names.

The architectures are the same (pre-norm RMSNorm, rotary embeddings, grouped-query attention,
SwiGLU, no biases); three things differ in layout and are converted here:

- **Fused projections.** Our ``attn.qkv`` holds Q, K and V stacked along the output dimension
  (``n_heads``, ``kv_heads``, ``kv_heads`` heads of ``head_dim`` rows) and ``mlp.gate_up`` the
  gate then the up projection; Llama has ``q_proj``/``k_proj``/``v_proj`` and
  ``gate_proj``/``up_proj``. The rows are split, not changed.
- **Rotary pairs.** We rotate adjacent pairs (dims 2i, 2i+1) by the angle of frequency i; Llama
  rotates dim i with dim i + head_dim/2 (``rotate_half``) by the same angle. Reordering each
  head's rows of Q and K to [0, 2, 4, ..., 1, 3, 5, ...] turns one into the other; the attention
  scores are sums over the head's dims, so Q·K is unchanged. V and the output projection are not
  rotated and keep their order.
- **Names.** ``attn_norm`` is ``input_layernorm``, ``mlp_norm`` ``post_attention_layernorm``,
  ``embed`` ``model.embed_tokens``. With tied embeddings the LM head is not stored
  (``tie_word_embeddings``), since safetensors refuses two names for one tensor.

Equal as computed: RMSNorm in FP32 with the weight applied after (``rms_norm_eps`` = our
``norm_eps``), attention scaled by 1/sqrt(head_dim), SiLU gate. Llama computes the rotary angles
in FP32 where we compute them in FP64 and round once, so logits agree to FP32 rounding, not bits.
Only torch is needed here; writing the files is :mod:`rayfp4.export`'s job.
"""

from __future__ import annotations

import torch

from .transformer import ModelConfig, Transformer


def rope_halves_order(head_dim: int) -> torch.Tensor:
    """Row order within a head that turns interleaved rotary pairs into Llama's halves."""
    return torch.cat([torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)])


def _to_halves(w: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    return w.view(heads, head_dim, -1)[:, rope_halves_order(head_dim)].reshape(heads * head_dim, -1)


def hf_llama_config(cfg: ModelConfig, *, eos_token_id: int | None = None, bos_token_id: int | None = None,
                    dtype: str = "float32") -> dict:
    """``config.json`` of the equivalent ``LlamaForCausalLM`` (transformers loads it without custom
    code). The rotary base is given both ways transformers has read it (``rope_theta`` before 5.0,
    ``rope_parameters`` since)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "initializer_range": cfg.init_std,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": None,
        "use_cache": True,
        "torch_dtype": dtype,
        "dtype": dtype,
    }


def hf_llama_state_dict(model: Transformer, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The weights under ``LlamaForCausalLM``'s names and layout: contiguous CPU tensors of
    ``dtype``, none sharing memory (what safetensors needs)."""
    cfg = model.config
    nh, kv, hd, f = cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.ffn_dim
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": model.embed.weight}
    for i, block in enumerate(model.layers):
        p = f"model.layers.{i}."
        q, k, v = block.attn.qkv.weight.split([nh * hd, kv * hd, kv * hd], dim=0)
        gate, up = block.mlp.gate_up.weight.split([f, f], dim=0)
        out.update({
            p + "input_layernorm.weight": block.attn_norm.weight,
            p + "self_attn.q_proj.weight": _to_halves(q, nh, hd),
            p + "self_attn.k_proj.weight": _to_halves(k, kv, hd),
            p + "self_attn.v_proj.weight": v,
            p + "self_attn.o_proj.weight": block.attn.proj.weight,
            p + "post_attention_layernorm.weight": block.mlp_norm.weight,
            p + "mlp.gate_proj.weight": gate,
            p + "mlp.up_proj.weight": up,
            p + "mlp.down_proj.weight": block.mlp.down.weight,
        })
    out["model.norm.weight"] = model.norm.weight
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = model.lm_head.weight
    return {k: t.detach().to("cpu", dtype).contiguous().clone() for k, t in out.items()}


def hf_names_of_linear(cfg: ModelConfig, name: str) -> list[tuple[str, int, int]]:
    """``[(hf weight name, first row, end row)]`` of our linear ``name`` as ``apply_precision_policy``
    names it (e.g. ``layers.0.attn.qkv``): the Llama weights its rows become, for exporting
    per-layer data such as NVFP4 codes. Rows are ours (before the rotary reordering of Q and K)."""
    nh, kv, hd, f = cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.ffn_dim
    parts = name.split(".")
    if name == "lm_head":
        return [("lm_head.weight", 0, cfg.vocab_size)]
    if len(parts) != 4 or parts[0] != "layers":
        raise KeyError(name)
    p = f"model.layers.{parts[1]}."
    table = {
        "attn.qkv": [(p + "self_attn.q_proj.weight", 0, nh * hd),
                     (p + "self_attn.k_proj.weight", nh * hd, (nh + kv) * hd),
                     (p + "self_attn.v_proj.weight", (nh + kv) * hd, (nh + 2 * kv) * hd)],
        "attn.proj": [(p + "self_attn.o_proj.weight", 0, cfg.d_model)],
        "mlp.gate_up": [(p + "mlp.gate_proj.weight", 0, f), (p + "mlp.up_proj.weight", f, 2 * f)],
        "mlp.down": [(p + "mlp.down_proj.weight", 0, cfg.d_model)],
    }
    return table[f"{parts[2]}.{parts[3]}"]
