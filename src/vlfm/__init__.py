"""vlfm: a compact PyTorch toolkit for vision-language foundation models."""

__version__ = "0.1.0"


def load(path, device="cpu", config=None, precision="auto"):
    """Load a model with its tokenizer and preprocessing attached: a vlfm checkpoint or run directory, a Hugging
    Face CLIP / SigLIP / BERT / LLaVA / Llama / Qwen2 directory, or open_clip weights (`config`: open_clip's
    model-config JSON). `precision` (auto | fp32 | bf16): what embedding runs in; auto is bf16 where it is fast."""
    from vlfm.checkpoint import load as load_checkpoint

    return load_checkpoint(path, device, config, precision)
