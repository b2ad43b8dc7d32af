"""Modules that own parameters and call :mod:`attnkit.functional`.

Names are resolved lazily (PEP 562) so ``import attnkit.nn`` stays cheap and one missing optional piece does not
break the others.
"""

from importlib import import_module

_WHERE = {
    "NadarayaWatson": "pooling",
    "AdditiveAttention": "scoring",
    "DotProductAttention": "scoring",
    "SelfAttention": "self_attention",
    "MultiHeadAttention": "multihead",
    "TransformerEncoderLayer": "transformer",
    "TransformerDecoderLayer": "transformer",
    "SinusoidalPositionalEncoding": "positional",
    "LearnedPositionalEmbedding": "positional",
    "RelativePositionBias": "positional",
    "RotaryEmbedding": "positional",
    "ALiBi": "positional",
    "LinearAttention": "linear_attention",
    "GATConv": "gat",
    "SplitAttention": "s2attention",
    "S2Attention": "s2attention",
    "PatchEmbedding": "vit",
    "ViT": "vit",
}

__all__ = sorted(_WHERE) + ["compat"]


def __getattr__(name: str):
    if name == "compat":
        return import_module("attnkit.nn.compat")
    if name in _WHERE:
        return getattr(import_module(f"attnkit.nn.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'attnkit.nn' has no attribute {name!r}")


def __dir__():
    return __all__
