"""A decoder-only transformer of the Llama family, in one readable file.

RMSNorm (pre-norm), rotary position embeddings, grouped-query causal attention through
``scaled_dot_product_attention``, a SwiGLU MLP, tied or untied embeddings. Every projection is a
plain ``nn.Linear``; ``rayfp4.precision.apply_precision_policy`` converts them afterwards. The
LM head is marked ``rayfp4_high_precision`` so it is never quantized; embeddings, norms, the
softmax and attention's own matmuls (QK^T, PV) are not linears and stay in high precision.
Generation passes a :class:`KVCache`: the prompt once, then one token per forward.

Initialisation: normal(0, init_std) for embeddings and projections, with the projections that
write into the residual stream (attention output, MLP down) scaled by 1/sqrt(2 * n_layers) so
the residual variance does not grow with depth; norms start at 1, biases are not used.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(8192, gt=0)
    seq_len: int = Field(256, gt=0, description="maximum sequence length (rotary table size)")
    n_layers: int = Field(4, gt=0)
    d_model: int = Field(256, gt=0)
    n_heads: int = Field(4, gt=0)
    n_kv_heads: int | None = Field(None, gt=0, description="grouped-query heads (default: n_heads)")
    d_ff: int | None = Field(None, gt=0, description="SwiGLU hidden width (default: ~8/3 d_model, multiple of 64)")
    tie_embeddings: bool = True
    rope_theta: float = Field(10000.0, gt=0)
    norm_eps: float = Field(1e-5, gt=0)
    init_std: float = Field(0.02, gt=0)

    @model_validator(mode="after")
    def _shapes(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} is not a multiple of n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"head dim {self.d_model // self.n_heads} must be even for rotary embeddings")
        kv = self.n_kv_heads or self.n_heads
        if self.n_heads % kv:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={kv}")
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.d_ff is not None:
            return self.d_ff
        return max(64, int(math.ceil(8 * self.d_model / 3 / 64)) * 64)

    def num_params(self) -> int:
        d, f, v = self.d_model, self.ffn_dim, self.vocab_size
        kv = self.kv_heads * self.head_dim
        per_layer = d * (d + 2 * kv) + d * d + 3 * d * f + 2 * d
        return self.n_layers * per_layer + v * d * (1 if self.tie_embeddings else 2) + d

    def flops_per_token(self) -> float:
        """Training FLOPs per token (6 N for the matmuls plus attention), for MFU estimates."""
        n = self.num_params() - self.vocab_size * self.d_model * (0 if self.tie_embeddings else 1)
        return 6 * n + 12 * self.n_layers * self.d_model * self.seq_len


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def rstd(self, xf: torch.Tensor) -> torch.Tensor:
        """1 / RMS of each row of the FP32 ``xf`` (with eps), shape [..., 1]: the reduction of the
        forward, which a quantized projection fusing the rest of the norm takes from here."""
        return torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * self.rstd(xf)
        return (y * self.weight.float()).to(x.dtype)


def normed_projection(linear: nn.Module, norm: RMSNorm, x: torch.Tensor) -> torch.Tensor:
    """``linear(norm(x))``; a quantized projection computes the norm's output itself, with the
    same bits, in the pass that measures its input's amax, where it says it can
    (rayfp4.precision.QuantizedLinear.fuses_rmsnorm)."""
    fuses = getattr(linear, "fuses_rmsnorm", None)
    if fuses is not None and fuses(x, norm):
        return linear(x, norm=norm)
    return linear(norm(x))


def rotary_tables(head_dim: int, seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv)
    return angles.cos().float(), angles.sin().float()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[2i], x[2i+1]) of x [B, H, T, D] by the position angle, in FP32."""
    xf = x.float().unflatten(-1, (-1, 2))
    a, b = xf[..., 0], xf[..., 1]
    out = torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.qkv = nn.Linear(cfg.d_model, (cfg.n_heads + 2 * cfg.kv_heads) * cfg.head_dim, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.proj.rayfp4_residual = True

    def forward(self, x, cos, sin, cache: "KVCache | None" = None, layer: int = 0, norm: RMSNorm | None = None):
        """Attention over x, or over ``norm(x)`` given the block's norm (applied by the projection)."""
        b, t, _ = x.shape
        qkv = self.qkv(x) if norm is None else normed_projection(self.qkv, norm, x)
        q, k, v = qkv.split(
            [self.n_heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], dim=-1)
        q = q.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        past = 0
        if cache is not None:  # decoding: attend to the cached positions too
            past = cache.length
            k, v = cache.append(layer, k, v)
        if self.kv_heads != self.n_heads:
            rep = self.n_heads // self.kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if past == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:  # query i sits at position past + i and sees keys 0 .. past + i
            mask = torch.ones(t, past + t, dtype=torch.bool, device=x.device).tril(past)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(y.transpose(1, 2).reshape(b, t, -1))


class SwiGLU(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_up = nn.Linear(cfg.d_model, 2 * cfg.ffn_dim, bias=False)
        self.down = nn.Linear(cfg.ffn_dim, cfg.d_model, bias=False)
        self.down.rayfp4_residual = True

    def forward(self, x, norm: RMSNorm | None = None):
        """The MLP of x, or of ``norm(x)`` given the block's norm (applied by the projection)."""
        gu = self.gate_up(x) if norm is None else normed_projection(self.gate_up, norm, x)
        fuses = getattr(self.down, "fuses_swiglu", None)
        if fuses is not None and fuses(gu):
            # A quantized down projection computes silu(gate) * up itself, with the same bits, in
            # the pass that measures its input's amax, and gu's gradient in the pass that measures
            # the gate_up projection's dY amaxes (rayfp4.precision.QuantizedLinear).
            return self.down(gu, swiglu=True, producer=self.gate_up)
        gate, up = gu.chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, cos, sin, cache: "KVCache | None" = None, layer: int = 0):
        x = x + self.attn(x, cos, sin, cache, layer, norm=self.attn_norm)
        return x + self.mlp(x, norm=self.mlp_norm)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.rayfp4_high_precision = True
        cos, sin = rotary_tables(cfg.head_dim, cfg.seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.config.init_std
        nn.init.normal_(self.embed.weight, 0.0, std)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                scale = 1 / math.sqrt(2 * self.config.n_layers) if getattr(m, "rayfp4_residual", False) else 1.0
                nn.init.normal_(m.weight, 0.0, std * scale)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None, cache: "KVCache | None" = None):
        """Logits [B, T, V] for tokens [B, T]; with ``targets`` [B, T], the mean cross-entropy.
        With a ``cache`` the tokens continue the positions it holds, and their keys and values
        are added to it (generation: the prompt once, then one token at a time)."""
        b, t = tokens.shape
        start = cache.length if cache is not None else 0
        if start + t > self.config.seq_len:
            raise ValueError(f"sequence length {start + t} exceeds the model's seq_len={self.config.seq_len}")
        x = self.embed(tokens)
        cos, sin = self.rope_cos[start:start + t], self.rope_sin[start:start + t]
        for i, block in enumerate(self.layers):
            x = block(x, cos, sin, cache, i)
        if cache is not None:
            cache.length += t
        logits = self.lm_head(self.norm(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


class KVCache:
    """The rotated keys and the values of the positions decoded so far, per layer, so that each new
    token costs one position's work instead of recomputing the whole prefix. Tensors are
    [B, kv_heads, max_len, head_dim], allocated on first use in the dtype the layer produces
    (BF16 under autocast); ``length`` positions are filled, the model advances it."""

    def __init__(self, n_layers: int, max_len: int):
        self.max_len = max_len
        self.length = 0
        self.k: list[torch.Tensor | None] = [None] * n_layers
        self.v: list[torch.Tensor | None] = [None] * n_layers

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k``, ``v`` [B, kv_heads, t, head_dim] after the cached positions; all of them."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions cannot take {end}")
        if self.k[layer] is None:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            self.k[layer] = k.new_zeros(shape)
            self.v[layer] = v.new_zeros(shape)
        self.k[layer][:, :, self.length:end] = k
        self.v[layer][:, :, self.length:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]


def build_model(cfg: ModelConfig | dict, device=None) -> Transformer:
    if isinstance(cfg, dict):
        cfg = ModelConfig.model_validate(cfg)
    model = Transformer(cfg)
    return model.to(device) if device is not None else model
