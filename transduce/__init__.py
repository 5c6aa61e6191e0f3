"""transduce: encoder-decoder (sequence-to-sequence) models on PyTorch."""

__version__ = "0.1.0"
