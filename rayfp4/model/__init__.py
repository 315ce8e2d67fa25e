"""The model: a decoder-only transformer of the Llama family (see ``transformer.py``)."""

from .transformer import ModelConfig, RMSNorm, Transformer, build_model

__all__ = ["ModelConfig", "RMSNorm", "Transformer", "build_model"]
