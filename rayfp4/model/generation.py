"""Sampling text from the transformer, one token per forward through a :class:`KVCache`.

The prompt fills the cache in one forward; each new token then costs one position's work, so
generating N tokens is linear in N, not quadratic. The model's rotary table ends at ``seq_len``:
when the context is full, the cache is refilled with the most recent ``seq_len // 2`` tokens
(positions restart at 0, as in training, where every sequence starts at position 0) and decoding
continues, so any number of tokens can be generated.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from .transformer import KVCache, Transformer


def sample_next(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None) -> int:
    """One token id from ``logits`` [V]: the most likely at temperature 0, else drawn from
    softmax(logits / temperature), restricted to the ``top_k`` most likely when ``top_k`` > 0."""
    logits = logits.float()
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if 0 < top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1).cpu()  # drawn on the CPU: the generator lives there
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def generate(model: Transformer, prompt: list[int], max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int = 0, generator: torch.Generator | None = None, stop_id: int | None = None,
             vocab_size: int | None = None, autocast: Callable = contextlib.nullcontext) -> list[int]:
    """The ids sampled after ``prompt`` (non-empty): ``max_new_tokens`` of them, fewer when
    ``stop_id`` is drawn (it is included). Ids at or above ``vocab_size`` (rows of the embedding
    that no tokenizer id maps to) are never drawn. ``model`` is the plain transformer or one
    with a precision policy applied; ``autocast()`` wraps each forward."""
    if not prompt:
        raise ValueError("the prompt is empty: generation needs at least one token to continue")
    window = model.config.seq_len
    device = model.rope_cos.device
    model.eval()
    history = list(prompt)
    pending = history[-window:]  # what the next forward feeds (the prompt, then one token)
    cache = KVCache(model.config.n_layers, window)
    out: list[int] = []
    while len(out) < max_new_tokens:
        if cache.length + len(pending) > window:  # context full: restart from the recent half
            cache = KVCache(model.config.n_layers, window)
            pending = history[-(window // 2):]
        with autocast():
            logits = model(torch.tensor([pending], device=device), cache=cache)[0, -1]
        if vocab_size is not None and vocab_size < logits.numel():
            logits = logits.clone()
            logits[vocab_size:] = float("-inf")
        token = sample_next(logits, temperature, top_k, generator)
        out.append(token)
        history.append(token)
        if token == stop_id:
            break
        pending = [token]
    return out
