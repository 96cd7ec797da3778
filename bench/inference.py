"""Encoding speed of vlfm's embedding path against open_clip and transformers on the same ViT-B/32 weights.

One open_clip ViT-B-32 with random weights (speed does not depend on them) is saved and loaded by vlfm (its
open_clip loader) and exported by vlfm to a Hugging Face directory that transformers' CLIPModel loads, so the
three hold the same weights (their fp32 features are checked to agree). Each library encodes the same batch of
`--batch` images (224 px) and of `--batch` captions (CLIP's BPE, padded to the longest: vlfm and transformers
take that; open_clip's text tower takes only its full 77-token context, so it gets them padded to 77): vlfm through `embed_images` / `embed_texts`,
the path `classify`, `embed`, `index`, `search` and `vlfm serve` use, at its default precision (`auto`: bf16
where the CPU has AVX512-BF16 or AMX, else fp32); open_clip (`encode_image` / `encode_text`) and transformers
(`get_image_features` / `get_text_features`) at their default, fp32, and also under bf16 autocast, which a user
can opt into. Every call is under inference_mode and normalises its output. Timed calls alternate between the
configurations, the order flipping each round; the median is reported, with the ratio of vlfm's default to
each peer. The difference of vlfm's default embeddings from fp32 ones is printed (largest element, smallest
cosine). Numbers are printed only.

    make bench-inference                                     # builds .venv-bench (open_clip, transformers) once
    .venv-bench/bin/python bench/inference.py --threads 1 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

import vlfm
from vlfm.interop.hf_clip import export_hf
from vlfm.nn import resolve_precision


def build(work: Path):
    import open_clip
    from transformers import CLIPModel

    torch.manual_seed(0)
    oc = open_clip.create_model("ViT-B-32", pretrained=None).eval()
    torch.save(oc.state_dict(), work / "oc.pt")
    bpe = open_clip.tokenizer.SimpleTokenizer()  # CLIP's BPE, written as vocab.json + merges.txt for vlfm to find
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}  # the names vocab.json uses
    (work / "vocab.json").write_text(json.dumps({names.get(k, k): v for k, v in bpe.encoder.items()}))
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    (work / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    ours = vlfm.load(work / "oc.pt", config=Path(open_clip.__file__).parent / "model_configs" / "ViT-B-32.json")
    export_hf(ours, work / "hf")
    hf = CLIPModel.from_pretrained(work / "hf", attn_implementation="sdpa").eval()
    return ours, oc, hf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5, help="timed calls per configuration, alternating")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0: every core this process may use")
    args = parser.parse_args()
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        ours, oc, hf = build(Path(tmp))
    precision = resolve_precision(ours.precision, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(args.batch, 3, 224, 224, generator=g)
    words = "a red circle left of a blue square , two green stars above a small yellow triangle".split()
    texts = [" ".join(words[i % 5:] + words[: i % 5]) for i in range(args.batch)]  # vlfm's path tokenizes itself
    ids, mask = ours.tokenize(texts)  # the same tokens for the peers: CLIP's BPE, padded to the longest caption
    ids77 = F.pad(ids, (0, 77 - ids.shape[1]))  # open_clip's text tower takes its full context only

    def peer(fn: Callable[[], torch.Tensor], bf16: bool) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext():
                return F.normalize(fn().float(), dim=-1)

        return call

    def vlfm_call(fn: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        def call() -> torch.Tensor:
            with torch.inference_mode():
                return fn()

        return call

    hf_text = lambda: hf.get_text_features(input_ids=ids, attention_mask=mask).pooler_output  # noqa: E731
    work = {
        "image": {"vlfm": vlfm_call(lambda: ours.embed_images(pixels)),
                  "open_clip": peer(lambda: oc.encode_image(pixels), False),
                  "transformers": peer(lambda: hf.get_image_features(pixel_values=pixels).pooler_output, False),
                  "open_clip bf16": peer(lambda: oc.encode_image(pixels), True),
                  "transformers bf16": peer(lambda: hf.get_image_features(pixel_values=pixels).pooler_output, True)},
        "text": {"vlfm": vlfm_call(lambda: ours.embed_texts(texts)),
                 "open_clip": peer(lambda: oc.encode_text(ids77), False),
                 "transformers": peer(hf_text, False),
                 "open_clip bf16": peer(lambda: oc.encode_text(ids77), True),
                 "transformers bf16": peer(hf_text, True)},
    }
    print(f"torch {torch.__version__}, {threads} threads, batch {args.batch}, ViT-B/32 (224 px; captions of "
          f"{ids.shape[1]} tokens, padded to 77 for open_clip), vlfm precision auto -> {precision}, {args.rounds} rounds")
    for kind, calls in work.items():
        ours.precision = "fp32"
        exact = calls["vlfm"]()
        agree = max((exact - calls[name]()).abs().max().item() for name in ("open_clip", "transformers"))
        ours.precision = "auto"
        default = calls["vlfm"]()
        print(f"{kind}: fp32 features of the three agree within {agree:.1e}; vlfm's default vs fp32: largest "
              f"element difference {(default - exact).abs().max().item():.1e}, smallest cosine "
              f"{(default * exact).sum(-1).min().item():.6f}")
        times: dict[str, list[float]] = {name: [] for name in calls}
        for call in calls.values():
            call()  # warm-up
        for r in range(args.rounds):
            for name in (list(calls) if r % 2 == 0 else list(reversed(calls))):
                start = time.perf_counter()
                calls[name]()
                times[name].append(time.perf_counter() - start)
        base = statistics.median(times["vlfm"])
        for name, t in times.items():
            median = statistics.median(t)
            ratio = "" if name == "vlfm" else f"   vlfm is {median / base:.2f}x"
            print(f"  {kind:5} {name:18} {args.batch / median:8.1f} per s{ratio}")


if __name__ == "__main__":
    main()
