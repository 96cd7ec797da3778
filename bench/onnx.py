"""Encode throughput on the CPU: the ONNX encoders `vlfm export --to onnx` writes, under onnxruntime, against
vlfm's PyTorch encoders, both on one thread, in one process, on the same inputs.

The model is a preset's (random weights: speed does not depend on them) with a BPE tokenizer trained on the
built-in world's captions. Images: `--batch` random pixel tensors; texts: `--batch` world captions, tokenized
once (tokenizing is outside the timing on both sides). Each side runs `--rounds` rounds after one warm-up; the
two alternate round by round so that load from other processes hits both alike, and the median round counts.
Also printed: the largest difference between the two sides' embeddings. The numbers are printed only.

    .venv/bin/python bench/onnx.py                              # configs/shapes-clip.yaml (64 px)
    .venv/bin/python bench/onnx.py --config configs/vit-b-32.yaml --batch 16 --rounds 5
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

# `python bench/onnx.py` puts bench/ first on the path, where this file would stand in for the onnx package.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).resolve().parent]

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from vlfm.config import load_config  # noqa: E402
from vlfm.data.shapes import ShapesWorld, WorldConfig  # noqa: E402
from vlfm.data.tokenizer import Tokenizer  # noqa: E402
from vlfm.data.world_text import captions  # noqa: E402
from vlfm.models import TwoTowerModel  # noqa: E402
from vlfm.models.onnx import export_onnx  # noqa: E402


def world_captions(n: int) -> list[str]:
    world = ShapesWorld(WorldConfig())
    return [text for i in range(n) for text in captions(world.scene("train", i))[:2]]


def timed(run, rounds: int) -> list[float]:
    run()  # warm-up
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def compare(name: str, torch_run, onnx_run, batch: int, rounds: int) -> None:
    torch_times, onnx_times = [], []
    for _ in range(rounds):  # alternate, one round each
        torch_times += timed(torch_run, 1)
        onnx_times += timed(onnx_run, 1)
    t, o = statistics.median(torch_times), statistics.median(onnx_times)
    difference = float(np.abs(torch_run() - onnx_run()).max())
    print(f"{name}: pytorch {batch / t:8.1f}/s  onnxruntime {batch / o:8.1f}/s  ratio onnx/pytorch {t / o:.2f}x  "
          f"max |difference| {difference:.1e}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/shapes-clip.yaml")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = load_config(args.config).model
    texts = world_captions(max(200, args.batch))
    model = TwoTowerModel(config, tokenizer=Tokenizer.train(texts, config.text.vocab_size)).eval()
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    with tempfile.TemporaryDirectory() as tmp:
        out = export_onnx(model, Path(tmp) / "onnx")
        image = ort.InferenceSession(str(out / "image_encoder.onnx"), options, providers=["CPUExecutionProvider"])
        text = ort.InferenceSession(str(out / "text_encoder.onnx"), options, providers=["CPUExecutionProvider"])
    size = config.vision.image_size
    pixels = torch.randn(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    ids, mask = model.tokenize(texts[: args.batch])
    feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
    feeds = {i.name: feeds[i.name] for i in text.get_inputs()}
    print(f"{args.config}: batch {args.batch}, {args.rounds} rounds, 1 thread; load average {Path('/proc/loadavg').read_text().split()[:3]}")
    compare("image", lambda: model.embed_images(pixels, args.batch).numpy(),
            lambda: image.run(None, {"pixel_values": pixels.numpy()})[0], args.batch, args.rounds)  # fmt: skip

    def torch_text():
        with torch.no_grad():
            return torch.nn.functional.normalize(model.encode_text(ids, mask), dim=-1).numpy()

    compare("text ", torch_text, lambda: text.run(None, feeds)[0], args.batch, args.rounds)


if __name__ == "__main__":
    main()
