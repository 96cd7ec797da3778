"""Checkpoints by name on the Hugging Face hub: `ORG/NAME`, `hf-hub:ORG/NAME`, either with `@REVISION`, and
open_clip's `MODEL/PRETRAINED_TAG` names (the hub repositories open_clip publishes them in).

huggingface_hub does the downloading and the caching (`snapshot_download`: its cache, HF_HOME / HF_HUB_CACHE,
HF_HUB_OFFLINE, revisions); this module only chooses the files a layout needs and turns its errors into one
CheckpointError line. A local path always wins over a name.
"""

from __future__ import annotations

import re
from pathlib import Path

from vlfm.io import CheckpointError

PREFIX = "hf-hub:"
NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")  # ORG/NAME[@REVISION]

# Everything but weights that any layout reads: configs, every tokenizer file, preprocessing, chat templates.
META_FILES = [
    "config.json", "open_clip_config.json", "model.safetensors.index.json", "preprocessor_config.json", "processor_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt", "vocab.txt",
    "spiece.model", "chat_template.jinja", "chat_template.json",
]  # fmt: skip
WEIGHTS = {  # per layout: safetensors first, pickled weights (read weights_only) only where a repo has no other
    "open_clip": (["open_clip_model.safetensors"], ["open_clip_pytorch_model.bin"]),
    "hf": (["model.safetensors", "model-*-of-*.safetensors"], ["pytorch_model.bin"]),
}

# open_clip's model configs (its model_configs/*.json) for the ViT CLIPs vlfm loads, and where open_clip's
# pretrained tags for them live on the hub (its pretrained.py). OpenAI's weights use QuickGELU.
_TEXT_B = {"context_length": 77, "vocab_size": 49408, "width": 512, "heads": 8, "layers": 12}
_TEXT_L = {"context_length": 77, "vocab_size": 49408, "width": 768, "heads": 12, "layers": 12}
OPEN_CLIP_MODELS = {
    "ViT-B-32": {"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 32}, "text_cfg": _TEXT_B},
    "ViT-B-16": {"embed_dim": 512, "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16}, "text_cfg": _TEXT_B},
    "ViT-L-14": {"embed_dim": 768, "vision_cfg": {"image_size": 224, "layers": 24, "width": 1024, "patch_size": 14}, "text_cfg": _TEXT_L},
    "ViT-L-14-336": {"embed_dim": 768, "vision_cfg": {"image_size": 336, "layers": 24, "width": 1024, "patch_size": 14}, "text_cfg": _TEXT_L},
    "ViT-H-14": {"embed_dim": 1024, "vision_cfg": {"image_size": 224, "layers": 32, "width": 1280, "head_width": 80, "patch_size": 14},
                 "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 1024, "heads": 16, "layers": 24}},
}  # fmt: skip
OPENAI = {"quick_gelu": True}
# open_clip's ViT CLIPs share OpenAI's BPE vocabulary, which open_clip ships in its package rather than in the
# weights' repositories: fetched from the repository transformers reads it from when a snapshot has no tokenizer.
CLIP_TOKENIZER = "openai/clip-vit-base-patch32"
TOKENIZER_FILES = ["tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"]
OPEN_CLIP_PRETRAINED = {  # (model, tag) -> (hub repository, changes to the model config and preprocessing)
    ("ViT-B-32", "openai"): ("timm/vit_base_patch32_clip_224.openai", OPENAI),
    ("ViT-B-32", "laion2b_s34b_b79k"): ("laion/CLIP-ViT-B-32-laion2B-s34B-b79K", {}),
    ("ViT-B-32", "datacomp_xl_s13b_b90k"): ("laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K", {}),
    ("ViT-B-16", "openai"): ("timm/vit_base_patch16_clip_224.openai", OPENAI),
    ("ViT-B-16", "laion2b_s34b_b88k"): ("laion/CLIP-ViT-B-16-laion2B-s34B-b88K", {}),
    ("ViT-B-16", "datacomp_xl_s13b_b90k"): ("laion/CLIP-ViT-B-16-DataComp.XL-s13B-b90K", {}),
    ("ViT-L-14", "openai"): ("timm/vit_large_patch14_clip_224.openai", OPENAI),
    ("ViT-L-14", "laion2b_s32b_b82k"): ("laion/CLIP-ViT-L-14-laion2B-s32B-b82K",
                                        {"preprocess_cfg": {"mean": (0.5,) * 3, "std": (0.5,) * 3}}),
    ("ViT-L-14", "datacomp_xl_s13b_b90k"): ("laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K", {}),
    ("ViT-L-14-336", "openai"): ("timm/vit_large_patch14_clip_336.openai", OPENAI),
    ("ViT-H-14", "laion2b_s32b_b79k"): ("laion/CLIP-ViT-H-14-laion2B-s32B-b79K", {}),
}  # fmt: skip


def is_name(spec: str | Path) -> bool:
    """Whether `spec` names a hub checkpoint rather than a local path: `hf-hub:...`, or `ORG/NAME[@REV]` /
    `MODEL/TAG` with nothing at that path here."""
    spec = str(spec)
    if spec.startswith(PREFIX):
        return True
    return bool(NAME.match(spec)) and not Path(spec).expanduser().exists()


def parse(spec: str) -> tuple[str, str | None, dict | None]:
    """(repository, revision or None, open_clip model config or None) of a name."""
    name, _, revision = str(spec).removeprefix(PREFIX).partition("@")
    model, _, tag = name.partition("/")
    if (model, tag) in OPEN_CLIP_PRETRAINED:
        repo, changes = OPEN_CLIP_PRETRAINED[model, tag]
        config = {**OPEN_CLIP_MODELS[model], **{k: v for k, v in changes.items() if k != "preprocess_cfg"}}
        meta = {"model_cfg": config, "preprocess_cfg": changes.get("preprocess_cfg", {}), "tokenizer_repo": CLIP_TOKENIZER}
        return repo, revision or None, meta
    if not NAME.match(name):
        raise CheckpointError(f"{spec!r} is not a hub name: ORG/NAME, hf-hub:ORG/NAME, either with @REVISION, or an "
                              f"open_clip MODEL/TAG ({', '.join('/'.join(k) for k in OPEN_CLIP_PRETRAINED)})")
    return name, revision or None, None


def open_clip_meta_for_name(spec: str | Path) -> dict | None:
    """The open_clip metadata (model_cfg, preprocess_cfg, tokenizer_repo) a `MODEL/TAG` name stands for, as
    interop.open_clip reads it (None for any other name or a local path)."""
    return parse(str(spec))[2] if is_name(spec) else None


def fetch(spec: str | Path) -> Path:
    """The snapshot directory of a hub name in huggingface_hub's cache (for an open_clip `MODEL/TAG`, its weights
    file), downloading what is missing: the metadata files first, then the weights of the layout they show
    (safetensors, else pickled weights)."""
    repo, revision, named_config = parse(str(spec))
    directory = _snapshot(spec, repo, revision, META_FILES)
    layout = "open_clip" if named_config or (directory / "open_clip_config.json").is_file() else "hf"
    safe, pickled = WEIGHTS[layout]
    directory = _snapshot(spec, repo, revision, META_FILES + safe)
    if not any(directory.glob(pattern) for pattern in safe):
        directory = _snapshot(spec, repo, revision, META_FILES + pickled)
    if named_config:  # the weights file itself: open_clip's config comes with the name, not from the repository
        return next((p for p in (directory / n for n in safe + pickled) if p.is_file()), directory)
    return directory


def tokenizer_directory(directory: Path, repo: str) -> Path:
    """`directory` if it holds a tokenizer, else the snapshot of `repo`'s tokenizer files alone."""
    if any((directory / name).is_file() for name in TOKENIZER_FILES[:3]):
        return directory
    return _snapshot(repo, repo, None, TOKENIZER_FILES)


def _snapshot(spec, repo: str, revision: str | None, patterns: list[str]) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo}{'@' + revision if revision else ''}"
    try:
        return Path(snapshot_download(repo, revision=revision, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        how = ("unset HF_HUB_OFFLINE and run once with network" if constants.HF_HUB_OFFLINE
               else "connect to the network once, or point HF_HOME / HF_HUB_CACHE at a cache that holds it")  # fmt: skip
        raise CheckpointError(f"{spec}: no such local path, and {where} is not in the Hugging Face cache "
                              f"{constants.HF_HUB_CACHE} and the hub cannot be reached: {how}") from None  # fmt: skip
    except GatedRepoError:
        raise CheckpointError(f"{spec}: {repo} is gated: accept its terms on the hub and log in (`hf auth login`)") from None
    except RepositoryNotFoundError:
        raise CheckpointError(f"{spec}: no local path and no hub repository {repo!r} (a private one needs "
                              "`hf auth login`)") from None  # fmt: skip
    except RevisionNotFoundError:
        raise CheckpointError(f"{spec}: {repo} has no revision {revision!r}") from None
    except HFValidationError as error:
        raise CheckpointError(f"{spec}: not a hub repository id: {error}") from None
    except HfHubHTTPError as error:
        raise CheckpointError(f"{spec}: the hub refused {where}: {str(error).splitlines()[0]}") from None
