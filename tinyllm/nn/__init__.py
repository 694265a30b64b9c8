"""Layers and models: `Module`, `Parameter` and the standard layers (as torch.nn)."""
from tinyllm.nn.module import Module, Parameter
from tinyllm.nn import functional
from tinyllm.nn.layers import Linear, Embedding, LayerNorm, RMSNorm, Dropout
