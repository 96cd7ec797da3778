"""The machinery every foreign layout shares: key maps, reading their weight files, translating their
image preprocessing.

A key map is a list of rules `(vlfm key, their key, how)`; `how` says how the tensor changes on the way:
  same    identical shape
  row     ours (1, N, D)  <-> theirs (N, D)            position embeddings
  scalar  ours ()         <-> theirs (1,)              SigLIP's logit scale and bias
  t       ours (out, in)  <-> theirs (in, out)         open_clip's projections (x @ proj)
  qkv     ours q, k, v    <-> theirs one fused tensor   nn.MultiheadAttention's in_proj (split along dim 0)
Every key of theirs is either mapped or listed as deliberately dropped; anything else is an error.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from vlfm.data.transforms import Preprocess
from vlfm.io import CheckpointError, raise_mismatch, read_json

log = logging.getLogger("vlfm")

Rule = tuple[str | tuple[str, ...], str, str]


QKV = ("attn.q_proj", "attn.k_proj", "attn.v_proj")


ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
               "relu": "relu", "silu": "silu", "swish": "silu"}  # fmt: skip


HF_ACTIVATIONS = {"quick_gelu": "quick_gelu", "gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "silu": "silu"}


RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}


OPENAI_MEAN, OPENAI_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def weight_bias(ours: str, theirs: str) -> list[Rule]:
    return [(f"{ours}.weight", f"{theirs}.weight", "same"), (f"{ours}.bias", f"{theirs}.bias", "same")]


def block_rules(ours: str, theirs: str, layers: int, names: dict[str, str], fused: str | None = None) -> list[Rule]:
    rules: list[Rule] = []
    for i in range(layers):
        for our, their in names.items():
            rules += weight_bias(f"{ours}.{i}.{our}", f"{theirs}.{i}.{their}")
        if fused:
            for part in ("weight", "bias"):
                rules.append((tuple(f"{ours}.{i}.{q}.{part}" for q in QKV), f"{theirs}.{i}.{fused}_{part}", "qkv"))
    return rules


def to_vlfm(theirs: dict[str, torch.Tensor], rules: list[Rule], dropped: list[str], expected: dict, source: str) -> dict:
    """Their state dict -> ours, refusing missing, unexpected and mis-shaped keys (all listed, in their names)."""
    ours, used, missing, shapes = {}, set(), [], []
    for our, their, how in rules:
        if their not in theirs:
            missing.append(their)
            continue
        used.add(their)
        tensor = theirs[their]
        if how == "qkv":
            if tensor.shape[0] % 3:
                shapes.append(f"{their}: {tuple(tensor.shape)} is not three stacked q/k/v")
                continue
            parts = dict(zip(our, tensor.chunk(3)))
        else:
            parts = {our: _reshape(tensor, how, to_ours=True)}
        for key, value in parts.items():
            if key in expected and tuple(value.shape) != tuple(expected[key].shape):
                shapes.append(f"{their}: checkpoint {tuple(tensor.shape)} does not fit the config ({tuple(expected[key].shape)} as {key})")
            ours[key] = value.contiguous()
    unexpected = [k for k in theirs if k not in used and not any(re.search(p, k) for p in dropped)]
    raise_mismatch(f"{source} does not match its config", missing, unexpected, shapes)
    return ours


def _reshape(tensor: torch.Tensor, how: str, to_ours: bool) -> torch.Tensor:
    if how == "row":
        return tensor.unsqueeze(0) if to_ours else tensor.squeeze(0)
    if how == "scalar":
        return tensor.reshape(()) if to_ours else tensor.reshape(1)
    if how == "t":
        return tensor.T
    if how != "same":
        raise ValueError(f"unknown reshape {how!r}")
    return tensor


def from_vlfm(ours: dict[str, torch.Tensor], rules: list[Rule]) -> dict[str, torch.Tensor]:
    out = {}
    for our, their, how in rules:
        if how == "qkv":
            out[their] = torch.cat([ours[k] for k in our])
        else:
            out[their] = _reshape(ours[our], how, to_ours=False)
    return {k: v.detach().contiguous().cpu() for k, v in out.items()}


def activation(name: str, where: str) -> str:
    if name not in ACTIVATIONS:
        raise CheckpointError(f"{where}: activation {name!r} is not supported (vlfm has {', '.join(ACTIVATIONS)})")
    return ACTIVATIONS[name]


def square(value, key: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise CheckpointError(f"{key}={value}: vlfm supports square images and patches only")
        value = value[0]
    return int(value)


def read_weights(directory: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, sharded model.safetensors.index.json, or pytorch_model.bin (weights_only)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        state: dict[str, torch.Tensor] = {}
        for name in sorted(set(read_json(index)["weight_map"].values())):
            if not (directory / name).is_file():
                raise CheckpointError(f"{index} names shard {name!r}, which is not in {directory}")
            state.update(load_file(str(directory / name)))
        return state
    if (directory / "model.safetensors").is_file():
        return load_file(str(directory / "model.safetensors"))
    if (directory / "pytorch_model.bin").is_file():
        return torch_weights(directory / "pytorch_model.bin")
    raise CheckpointError(f"{directory} has no weights (model.safetensors, model.safetensors.index.json or pytorch_model.bin)")


def torch_weights(path: Path) -> dict[str, torch.Tensor]:
    """A .bin/.pt state dict through torch.load(weights_only=True): tensors only, never arbitrary pickles.
    Training checkpoints ({'state_dict': ...}) and DDP's 'module.' prefix are unwrapped."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - the unpickler's own message says which type it refused
        raise CheckpointError(f"{path} cannot be read as a weights-only state dict: {error}") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a state dict")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def hf_preprocess(directory: Path, kind: str, image_size: int) -> Preprocess:
    """preprocessor_config.json (or the image_processor of processor_config.json, as transformers 5 saves a
    processor) -> Preprocess; documented defaults (said in the log) when neither is there."""
    path, processor = directory / "preprocessor_config.json", directory / "processor_config.json"
    inside = read_json(processor).get("image_processor") if processor.is_file() and not path.is_file() else None
    if not path.is_file() and not isinstance(inside, dict):
        defaults = (Preprocess(image_size=image_size, mean=OPENAI_MEAN, std=OPENAI_STD) if kind == "clip"
                    else Preprocess(image_size=image_size, resize_mode="squash"))  # fmt: skip
        log.warning("%s has no preprocessor_config.json: using the %s defaults %s", directory, kind, defaults)
        return defaults
    c, path = (inside, processor) if isinstance(inside, dict) else (read_json(path), path)
    if c.get("do_pad"):
        log.warning("%s: do_pad (pad to a square before resizing) is not supported: images are resized and cropped "
                    "unpadded, so non-square images differ from what the model was trained on", path)
    size, crop = c.get("size", image_size), c.get("crop_size", image_size)
    if c.get("do_center_crop", False):
        crop = square([crop["height"], crop["width"]] if isinstance(crop, dict) else crop, f"{path}: crop_size")
        short = size.get("shortest_edge", crop) if isinstance(size, dict) else size
        if short != crop:
            log.warning("%s: resize to %s then crop %s; vlfm resizes the short side to the crop size", path, short, crop)
        size, mode = crop, "shortest"
    else:
        size = square([size["height"], size["width"]] if isinstance(size, dict) else size, f"{path}: size")
        mode = "squash"
    normalize = c.get("do_normalize", True)
    return Preprocess(
        image_size=size, resize_mode=mode, interpolation=RESAMPLE.get(c.get("resample", 3), "bicubic"),
        mean=tuple(c.get("image_mean", OPENAI_MEAN)) if normalize else (0.0, 0.0, 0.0),
        std=tuple(c.get("image_std", OPENAI_STD)) if normalize else (1.0, 1.0, 1.0),
    )  # fmt: skip
