"""The model: a decoder-only transformer of the Llama family (see ``transformer.py``)."""

from .transformer import KVCache, ModelConfig, RMSNorm, Transformer, build_model

__all__ = ["KVCache", "ModelConfig", "RMSNorm", "Transformer", "build_model"]
