"""vlfm: a compact PyTorch toolkit for vision-language foundation models."""

__version__ = "0.1.0"


def load(path, device="cpu"):
    """Load a vlfm checkpoint or run directory: the model with its tokenizer and preprocessing attached."""
    from vlfm.checkpoint import load as _load

    return _load(path, device)
