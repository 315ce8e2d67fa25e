"""The Hugging Face Llama export: transformers computes our logits from the converted weights, and
the exported tokenizer gives our token ids.

Tolerance of the logits comparison, max |ours - theirs| <= 1e-4 * max |ours| (FP32 on the CPU): the
two models compute the same function with FP32 arithmetic in other orders (separate Q/K/V and
gate/up GEMMs instead of fused ones) and Llama takes its rotary angles in FP32 where we take them in
FP64 and round once (its frequency and its product with the position each round, up to ~6e-6 rad
at position 63). Measured differences are ~1.5e-6 relative; a conversion mistake (the rotary pair order,
a swapped gate/up, a missing norm) moves logits by the order of the logits themselves, which the
test also checks for the rotary order, the subtle one.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from rayfp4.data.tokenizer import ByteTokenizer, byte_level_chars, train_bpe
from rayfp4.model import ModelConfig, build_model
from rayfp4.model import hf_llama
from rayfp4.model.hf_llama import hf_llama_config, hf_llama_state_dict

TEXTS = ["Fair is foul, and foul is fair:\n  Hover through the fog and filthy air.",
         "ça va — 日本語 \t tabs, émojis 🎭 and \x00 control \x7f bytes", "", " leading space", "x" * 300]


def logits_tolerance(ours: torch.Tensor) -> float:
    return 1e-4 * ours.abs().max().item()


def save_hf(model, directory, eos=0):
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(hf_llama_config(model.config, eos_token_id=eos, bos_token_id=eos)))
    save_file(hf_llama_state_dict(model), str(directory / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.slow
@pytest.mark.parametrize("tie,kv_heads", [(True, 2), (False, 4)])
def test_transformers_llama_computes_our_logits(tmp_path, tie, kv_heads, monkeypatch):
    transformers = pytest.importorskip("transformers")
    cfg = ModelConfig(vocab_size=300, seq_len=64, n_layers=2, d_model=64, n_heads=4, n_kv_heads=kv_heads, d_ff=96,
                      tie_embeddings=tie, rope_theta=500.0, norm_eps=1e-6, init_std=0.15)
    model = build_model(cfg).eval()
    with torch.no_grad():  # norms that are not all ones, so that a misplaced norm weight shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(1.0, 0.3)
    save_hf(model, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.tie_word_embeddings == tie
    tokens = torch.randint(0, cfg.vocab_size, (3, cfg.seq_len))
    with torch.no_grad():
        ours, theirs = model(tokens), hf(tokens).logits
    tol = logits_tolerance(ours)
    assert (ours - theirs).abs().max().item() <= tol

    # The test can tell: without the rotary reordering the logits are far off.
    monkeypatch.setattr(hf_llama, "rope_halves_order", lambda head_dim: torch.arange(head_dim))
    save_hf(model, tmp_path / "wrong")
    wrong = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "wrong").eval()
    with torch.no_grad():
        assert (ours - wrong(tokens).logits).abs().max().item() > 100 * tol


def test_weight_names_and_shapes_follow_llama():
    cfg = ModelConfig(vocab_size=100, seq_len=16, n_layers=1, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48,
                      tie_embeddings=False)
    model = build_model(cfg)
    sd = hf_llama_state_dict(model, torch.bfloat16)
    assert {k: tuple(v.shape) for k, v in sd.items()} == {
        "model.embed_tokens.weight": (100, 32), "lm_head.weight": (100, 32), "model.norm.weight": (32,),
        "model.layers.0.input_layernorm.weight": (32,), "model.layers.0.post_attention_layernorm.weight": (32,),
        "model.layers.0.self_attn.q_proj.weight": (32, 32), "model.layers.0.self_attn.k_proj.weight": (16, 32),
        "model.layers.0.self_attn.v_proj.weight": (16, 32), "model.layers.0.self_attn.o_proj.weight": (32, 32),
        "model.layers.0.mlp.gate_proj.weight": (48, 32), "model.layers.0.mlp.up_proj.weight": (48, 32),
        "model.layers.0.mlp.down_proj.weight": (32, 48)}
    assert all(v.dtype == torch.bfloat16 and v.is_contiguous() for v in sd.values())
    # V and the gate/up halves are the fused weights' rows, unchanged; Q's rows of head 1 are
    # reordered within the head (even dims first).
    qkv = model.layers[0].attn.qkv.weight.to(torch.bfloat16)
    assert torch.equal(sd["model.layers.0.self_attn.v_proj.weight"], qkv[48:])
    assert torch.equal(sd["model.layers.0.self_attn.q_proj.weight"][8:16], qkv[8:16][[0, 2, 4, 6, 1, 3, 5, 7]])
    assert torch.equal(sd["model.layers.0.mlp.up_proj.weight"], model.layers[0].mlp.gate_up.weight[48:].to(torch.bfloat16))


def test_byte_tokenizer_as_hf_tokenizer_gives_the_same_ids():
    from tokenizers import Tokenizer, pre_tokenizers

    assert sorted(byte_level_chars()) == sorted(pre_tokenizers.ByteLevel.alphabet())
    byte = ByteTokenizer()
    hf = Tokenizer.from_str(byte.to_hf_json())
    assert hf.get_vocab_size() == 257 and hf.token_to_id("<|endoftext|>") == 256
    every_byte = bytes(range(256)).decode("latin-1")
    for text in TEXTS + [every_byte]:
        ids = hf.encode(text, add_special_tokens=False).ids
        assert ids == byte.encode_batch([text])[0].tolist()
        assert hf.decode(ids) == text


def test_bpe_tokenizer_json_is_the_trained_one():
    from tokenizers import Tokenizer

    bpe = train_bpe(iter(TEXTS * 3), 300)
    hf = Tokenizer.from_str(bpe.to_hf_json())
    for text in TEXTS:
        ids = np.asarray(hf.encode(text, add_special_tokens=False).ids)
        assert np.array_equal(ids, bpe.encode_batch([text])[0]) and hf.decode(ids.tolist()) == text
