"""Export a two-tower model's encoders as ONNX graphs for deployment (`vlfm export MODEL --to onnx OUT/`).

OUT/ holds image_encoder.onnx (pixel_values float (B, 3, S, S), normalised as preprocess.json says ->
image_embeds (B, D)), text_encoder.onnx (input_ids, and attention_mask where the tower reads it, int64 (B, L) -> text_embeds (B, D); a causal tower
pooling at the end token ignores right padding, so its graph has no mask input), both
embeddings L2-normalised and the batch (and text length) dynamic, beside preprocess.json, tokenizer.json and
onnx_config.json (input names, context length, padding, logit scale and bias). Written atomically.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vlfm.io import UsageError, atomic_directory

OPSET = 17


class ImageEncoder(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_image(pixel_values).float(), dim=-1)


class TextEncoder(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_text(input_ids, attention_mask).float(), dim=-1)


def _example_texts(model) -> tuple[torch.Tensor, torch.Tensor]:
    """Two texts of different lengths, so the traced graph is the padded one (the mask applied where the model
    applies it); with every mask entry 1 that graph gives the unpadded result."""
    return model.tokenize(["a photo of a red circle and a blue square", "a"])


def _export(module: nn.Module, inputs: tuple, path: Path, names: list[str], output: str, axes: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on Python-level shape checks, constant in the graph
        torch.onnx.export(module, inputs, str(path), input_names=names, output_names=[output], dynamic_axes=axes,
                          opset_version=OPSET, dynamo=False)  # fmt: skip


def export_onnx(model, out: str | Path) -> Path:
    """Write OUT/ (see the module's doc) for a model with both towers and a tokenizer."""
    if not (hasattr(model, "visual") and hasattr(model, "text")) or model.tokenizer is None:
        raise UsageError(f"ONNX export needs an image-text model with a tokenizer; this is a {type(model).__name__}")
    try:
        import onnx
    except ImportError:
        raise UsageError("ONNX export needs the onnx package: pip install 'vlfm[onnx]' (onnx, onnxruntime)") from None

    if model.device.type != "cpu" or model.logit_scale.dtype != torch.float32:
        raise UsageError("ONNX export traces a float32 model on the CPU: load it with the default device and dtype")
    was_training = model.training
    model.eval()  # and the wrappers too: the exporter puts a module it found training back into training mode
    size = model.preprocess_config.image_size
    batch = {0: "batch"}
    with torch.no_grad(), atomic_directory(out) as tmp:
        _export(ImageEncoder(model).eval(), (torch.zeros(2, 3, size, size),), tmp / "image_encoder.onnx", ["pixel_values"],
                "image_embeds", {"pixel_values": batch, "image_embeds": batch})  # fmt: skip
        text_axes = {"input_ids": {0: "batch", 1: "length"}, "attention_mask": {0: "batch", 1: "length"}, "text_embeds": batch}
        _export(TextEncoder(model).eval(), _example_texts(model), tmp / "text_encoder.onnx", ["input_ids", "attention_mask"],
                "text_embeds", text_axes)  # fmt: skip
        model.tokenizer.save(tmp / "tokenizer.json")
        model.preprocess_config.save(tmp / "preprocess.json")
        text = model.text.config
        config = {"embed_dim": model.config.embed_dim, "kind": model.config.kind, "image_size": size,
                  "context_length": text.context_length, "pad_to_context": text.pool == "end",
                  "pad_id": model.tokenizer.pad_id, "logit_scale": float(model.logit_scale.exp()),
                  "logit_bias": None if model.logit_bias is None else float(model.logit_bias), "opset": OPSET,
                  "text_inputs": [i.name for i in onnx.load(tmp / "text_encoder.onnx").graph.input]}  # fmt: skip
        (tmp / "onnx_config.json").write_text(json.dumps(config, indent=2))
    model.train(was_training)
    return Path(out)
