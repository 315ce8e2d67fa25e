"""Generation: the KV cache computes what the full forward computes, one position per new token."""

from __future__ import annotations

import pytest
import torch

from rayfp4.model import KVCache, ModelConfig, build_model
from rayfp4.model.generation import generate, sample_next

# GQA (2 KV heads for 4 query heads) and weights large enough that attention is far from uniform,
# so a wrong mask or position would show in the logits.
CFG = ModelConfig(vocab_size=97, seq_len=24, n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_ff=128, init_std=0.15)


@pytest.fixture
def model():
    return build_model(CFG).eval()


@torch.no_grad()
def test_cached_forward_equals_full_forward(model):
    x = torch.randint(0, CFG.vocab_size, (3, CFG.seq_len))
    full = model(x)
    cache = KVCache(CFG.n_layers, CFG.seq_len)
    # A prefill, a single token, a chunk after cached positions (the explicit-mask case), then one
    # token at a time up to the end of the rotary table.
    pieces = [x[:, :7], x[:, 7:8], x[:, 8:13]] + [x[:, i:i + 1] for i in range(13, CFG.seq_len)]
    stepwise = torch.cat([model(p, cache=cache) for p in pieces], dim=1)
    assert cache.length == CFG.seq_len
    torch.testing.assert_close(stepwise, full, rtol=0, atol=2e-5)  # FP32 summation order only
    with pytest.raises(ValueError, match="exceeds the model's seq_len"):
        model(x[:, :1], cache=cache)


@torch.no_grad()
def test_greedy_generation_equals_argmax_of_full_forwards_and_is_linear(model):
    prompt = torch.randint(0, CFG.vocab_size, (5,)).tolist()
    fed = []
    handle = model.embed.register_forward_hook(lambda m, inp, out: fed.append(inp[0].shape[1]))
    try:
        out = generate(model, prompt, 10, temperature=0)
    finally:
        handle.remove()
    # The prompt once, then one token per step: no position is computed twice.
    assert fed == [5] + [1] * 9
    seq = list(prompt)
    for _ in range(10):
        seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert out == seq[5:]


@torch.no_grad()
def test_generation_past_the_context_slides_and_stops_at_the_stop_token(model):
    prompt = torch.randint(0, CFG.vocab_size, (30,)).tolist()  # longer than seq_len=24
    fed = []
    handle = model.embed.register_forward_hook(lambda m, inp, out: fed.append(inp[0].shape[1]))
    try:
        out = generate(model, prompt, 40, temperature=1.0, generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    assert len(out) == 40
    # The last 24 prompt tokens fill the window; when full, the last 12 tokens refill it.
    assert fed[0] == 24 and fed[1] == 12 and set(fed[2:]) <= {1, 12} and max(fed) <= 24
    greedy = generate(model, prompt[:3], 5, temperature=0)
    stopped = generate(model, prompt[:3], 5, temperature=0, stop_id=greedy[1])
    assert stopped == greedy[:greedy.index(greedy[1]) + 1]  # up to its first occurrence, included


def test_sampling_respects_seed_top_k_and_vocabulary():
    logits = torch.tensor([0.0, 3.0, 2.9, 2.8, -1.0, 5.0])
    def draws(seed):
        g = torch.Generator().manual_seed(seed)
        return [sample_next(logits, 1.0, 0, g) for _ in range(30)]

    assert draws(3) == draws(3) and draws(3) != draws(4)
    g = torch.Generator().manual_seed(0)
    assert {sample_next(logits, 1.0, 3, g) for _ in range(300)} == {1, 2, 5}
    assert {sample_next(logits, 2.0, 1, g) for _ in range(20)} == {5}
    assert sample_next(logits, 0, 0, None) == 5
    model = build_model(CFG).eval()
    out = generate(model, [1, 2], 50, temperature=5.0, generator=torch.Generator().manual_seed(1), vocab_size=7)
    assert set(out) <= set(range(7)) and len(set(out)) > 2
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(model, [], 3)
