"""The conv stem's input layout: NCHW-contiguous (what ConvStem.forward uses) against channels_last, measured in
one process, interleaved rounds, 1 thread: the stem alone (forward + backward) and a whole training step of the
`shapes-clip` preset's model (batch 64, both towers, AdamW), in fp32 and under bf16 autocast.

    .venv/bin/python bench/conv_stem.py [--rounds 3] [--steps 20]
"""

from __future__ import annotations

import argparse
import time

import torch

from vlfm.config import load_config
from vlfm.models.two_tower import TwoTowerModel
from vlfm.models.vit import ConvStem

LAYOUTS = {
    "contiguous": ConvStem.forward,
    "channels_last": lambda self, x: self.layers(x.contiguous(memory_format=torch.channels_last)),
}


def timed(step, layout: str, n: int) -> float:
    ConvStem.forward = LAYOUTS[layout]
    step()  # warm-up in this layout
    start = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - start) / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = load_config("configs/shapes-clip.yaml").model
    model = TwoTowerModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    pixels = torch.randn(64, 3, 64, 64)
    tokens = torch.randint(4, config.text.vocab_size, (64, 20))
    tokens[:, -1] = config.text.eos_token_id

    for precision in ("fp32", "bf16"):
        def autocast(bf16=precision == "bf16"):
            return torch.autocast("cpu", torch.bfloat16, enabled=bf16)

        def stem_step():
            with autocast():
                out = model.visual.patch_embed(pixels)
            out.float().square().mean().backward()

        def train_step():
            with autocast():
                logits = model.encode_image(pixels).float() @ model.encode_text(tokens).float().T
            logits.logsumexp(1).mean().backward()
            optimizer.step()
            optimizer.zero_grad()

        for name, step in (("stem fwd+bwd", stem_step), ("training step", train_step)):
            times = {layout: [] for layout in LAYOUTS}
            for _ in range(args.rounds):
                for layout in LAYOUTS:
                    times[layout].append(timed(step, layout, args.steps))
            best = {layout: min(t) * 1e3 for layout, t in times.items()}
            print(f"{precision} {name}: contiguous {best['contiguous']:.1f} ms, channels_last "
                  f"{best['channels_last']:.1f} ms, x{best['contiguous'] / best['channels_last']:.2f} (best of {args.rounds})")
    ConvStem.forward = LAYOUTS["contiguous"]


if __name__ == "__main__":
    main()
