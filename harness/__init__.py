"""gqa-harness: numerical correctness of PyTorch SDPA with grouped-query attention."""

__version__ = "0.1.0"
