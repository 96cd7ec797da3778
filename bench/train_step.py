"""Training throughput of vlfm against open_clip on one tiny CLIP config, measured in the same process.

Both models get the same batch, optimizer and thread count. Timed blocks alternate between the two (and the
order flips every round) so that load from other processes on the machine hits both alike; the median block
of each is reported. The numbers are printed only: a speed is never a test assertion.

    make bench                                  # builds .venv-bench (torch + torchvision + open_clip) once
    .venv-bench/bin/python bench/train_step.py --batch-size 64 --steps 5 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
import warnings

import torch

from vlfm.config import ModelConfig, TextConfig, VisionConfig
from vlfm.losses import clip_loss
from vlfm.models.two_tower import TwoTowerModel

EMBED, IMAGE, PATCH, WIDTH, LAYERS, HEADS, CONTEXT, VOCAB, EOS = 128, 64, 8, 128, 4, 4, 32, 1024, 2


def build_vlfm() -> torch.nn.Module:
    return TwoTowerModel(ModelConfig(kind="clip", embed_dim=EMBED, vision=VisionConfig(
        image_size=IMAGE, patch_size=PATCH, width=WIDTH, layers=LAYERS, heads=HEADS,
        class_token=True, pool="cls", pre_norm=True, patch_bias=False),
        text=TextConfig(vocab_size=VOCAB, context_length=CONTEXT, width=WIDTH, layers=LAYERS, heads=HEADS,
                        causal=True, pool="eos", eos_token_id=EOS)))


def build_open_clip() -> torch.nn.Module:
    import open_clip

    # GELU (not QuickGELU), class-token pooling, ln_pre, no patch bias: open_clip's defaults match vlfm's config above.
    return open_clip.model.CLIP(
        embed_dim=EMBED,
        vision_cfg={"image_size": IMAGE, "patch_size": PATCH, "width": WIDTH, "layers": LAYERS, "head_width": WIDTH // HEADS},
        text_cfg={"context_length": CONTEXT, "vocab_size": VOCAB, "width": WIDTH, "heads": HEADS, "layers": LAYERS},
        output_dict=True,
    )


def make_batch(batch_size: int, pad: bool):
    """Pixels N(0,1) and token ids ending in an end-of-text token, the same tokens for both models.

    vlfm finds the eos by its id (2); open_clip pools at the argmax id, so its copy carries the largest id there.
    With `pad`, captions end at random positions and vlfm gets the padding mask its trainer passes; open_clip's
    text tower takes no padding mask (only the causal one), so it gets none."""
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch_size, 3, IMAGE, IMAGE, generator=g)
    ids = torch.randint(3, VOCAB - 1, (batch_size, CONTEXT), generator=g)
    ends = torch.randint(CONTEXT // 2, CONTEXT, (batch_size,), generator=g) if pad else torch.full((batch_size,), CONTEXT - 1)
    positions = torch.arange(CONTEXT)[None, :]
    ids[positions > ends[:, None]] = 0
    mask = (positions <= ends[:, None]).long()
    rows = torch.arange(batch_size)
    vlfm_ids, oc_ids = ids.clone(), ids.clone()
    vlfm_ids[rows, ends], oc_ids[rows, ends] = EOS, VOCAB - 1
    return pixels, vlfm_ids, mask, oc_ids


def make_step(model: torch.nn.Module, loss_fn):
    # vlfm's own defaults (train.lr, weight_decay, betas, eps) for both, applied to every parameter alike.
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6)
    model.train()

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        optimizer.step()
        return loss.item()

    return step


def timed(step, steps: int, batch_size: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="training steps per timed block")
    parser.add_argument("--rounds", type=int, default=5, help="timed blocks per library, alternating")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per library first")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0: every core this process may use")
    parser.add_argument("--no-pad", action="store_true", help="full-length captions: no padding mask for vlfm")
    args = parser.parse_args()

    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    vlfm_model = build_vlfm()
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:  # show, once, anything open_clip warns about
        warnings.simplefilter("always")
        from open_clip.loss import ClipLoss

        oc_model = build_open_clip()
    for warning in caught:
        print(f"open_clip warning: {warning.category.__name__}: {warning.message}")
    oc_loss = ClipLoss()

    pixels, vlfm_ids, mask, oc_ids = make_batch(args.batch_size, pad=not args.no_pad)
    steps = {
        "vlfm": make_step(vlfm_model, lambda: clip_loss(*vlfm_model(pixels, vlfm_ids, mask)[:3])),
        "open_clip": make_step(oc_model, lambda: oc_loss(**oc_model(pixels, oc_ids))),
    }
    counts = {name: sum(p.numel() for p in model.parameters()) for name, model in
              (("vlfm", vlfm_model), ("open_clip", oc_model))}

    print(f"torch {torch.__version__}, {threads} threads, batch {args.batch_size}, fp32, AdamW, "
          f"{args.rounds} rounds x {args.steps} steps, {'full-length captions' if args.no_pad else 'padded captions'}")
    losses = {}
    for name, step in steps.items():  # untimed: first calls allocate buffers and optimizer state
        for _ in range(max(1, args.warmup)):
            losses[name] = step()
    samples = {name: [] for name in steps}
    for r in range(args.rounds):
        # Flip the order each round so neither library always runs right after the other's warm caches.
        for name in (list(steps) if r % 2 == 0 else list(reversed(steps))):
            samples[name].append(timed(steps[name], args.steps, args.batch_size))

    print(f"{'':10} {'params':>10} {'loss':>7} {'median/s':>9} {'min/s':>8} {'max/s':>8}")
    for name in steps:
        s = samples[name]
        print(f"{name:10} {counts[name]:>10,} {losses[name]:>7.3f} {statistics.median(s):>9.1f} {min(s):>8.1f} {max(s):>8.1f}")
    difference = counts["vlfm"] / counts["open_clip"] - 1
    if abs(difference) > 0.05:
        print(f"WARNING: parameter counts differ by {difference:+.1%}: the two configs do not match")
    print(f"ratio vlfm/open_clip: {statistics.median(samples['vlfm']) / statistics.median(samples['open_clip']):.2f}")


if __name__ == "__main__":
    main()
