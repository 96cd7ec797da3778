"""Training throughput of vlfm against open_clip on one tiny CLIP config, measured in the same process.

Both models get the same batch, optimizer and thread count. vlfm runs at its default `train.precision: auto`
(bf16 autocast where the CPU has AVX512-BF16 or AMX, else fp32; `--precision` overrides), open_clip at its
default, fp32, and also under the same bf16 autocast (`open_clip bf16`, which a user can opt into). Timed blocks alternate between the two (and the
order flips every round) so that load from other processes on the machine hits both alike; the median block
of each is reported. The numbers are printed only: a speed is never a test assertion.

    make bench                                  # builds .venv-bench (torch + torchvision + open_clip) once
    .venv-bench/bin/python bench/train_step.py --batch-size 64 --steps 5 --rounds 3
    .venv-bench/bin/python bench/train_step.py --size b32 --steps 2 --rounds 3    # ViT-B/32's dimensions, batch 16
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
from vlfm.nn import autocast, compile_blocks, resolve_precision

EOS = 2
SIZES = {  # --size: the tiny config, and ViT-B/32's dimensions (224 px, text 77 x 512, 12 + 12 layers)
    "tiny": dict(embed=128, image=64, patch=8, vwidth=128, vlayers=4, vheads=4, context=32, vocab=1024, twidth=128,
                 tlayers=4, theads=4),
    "b32": dict(embed=512, image=224, patch=32, vwidth=768, vlayers=12, vheads=12, context=77, vocab=49408, twidth=512,
                tlayers=12, theads=8),
}
D = SIZES["tiny"]


def build_vlfm() -> torch.nn.Module:
    return TwoTowerModel(ModelConfig(kind="clip", embed_dim=D["embed"], vision=VisionConfig(
        image_size=D["image"], patch_size=D["patch"], width=D["vwidth"], layers=D["vlayers"], heads=D["vheads"],
        class_token=True, pool="cls", pre_norm=True, patch_bias=False),
        text=TextConfig(vocab_size=D["vocab"], context_length=D["context"], width=D["twidth"], layers=D["tlayers"],
                        heads=D["theads"],
                        causal=True, pool="eos", eos_token_id=EOS)))


def build_open_clip() -> torch.nn.Module:
    import open_clip

    # GELU (not QuickGELU), class-token pooling, ln_pre, no patch bias: open_clip's defaults match vlfm's config above.
    return open_clip.model.CLIP(
        embed_dim=D["embed"],
        vision_cfg={"image_size": D["image"], "patch_size": D["patch"], "width": D["vwidth"], "layers": D["vlayers"],
                    "head_width": D["vwidth"] // D["vheads"]},
        text_cfg={"context_length": D["context"], "vocab_size": D["vocab"], "width": D["twidth"], "heads": D["theads"],
                  "layers": D["tlayers"]},
        output_dict=True,
    )


def make_batch(batch_size: int, pad: bool):
    """Pixels N(0,1) and token ids ending in an end-of-text token, the same tokens for both models.

    vlfm finds the eos by its id (2); open_clip pools at the argmax id, so its copy carries the largest id there.
    With `pad`, captions end at random positions and vlfm gets the padding mask its trainer passes; open_clip's
    text tower takes no padding mask (only the causal one), so it gets none."""
    g = torch.Generator().manual_seed(0)
    context, vocab = D["context"], D["vocab"]
    pixels = torch.randn(batch_size, 3, D["image"], D["image"], generator=g)
    ids = torch.randint(3, vocab - 1, (batch_size, context), generator=g)
    ends = torch.randint(context // 2, context, (batch_size,), generator=g) if pad else torch.full((batch_size,), context - 1)
    positions = torch.arange(context)[None, :]
    ids[positions > ends[:, None]] = 0
    mask = (positions <= ends[:, None]).long()
    rows = torch.arange(batch_size)
    vlfm_ids, oc_ids = ids.clone(), ids.clone()
    vlfm_ids[rows, ends], oc_ids[rows, ends] = EOS, vocab - 1
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
    parser.add_argument("--size", choices=SIZES, default="tiny", help="tiny, or ViT-B/32's dimensions")
    parser.add_argument("--batch-size", type=int, default=0, help="0: 128 for tiny, 16 for b32")
    parser.add_argument("--steps", type=int, default=10, help="training steps per timed block")
    parser.add_argument("--rounds", type=int, default=5, help="timed blocks per library, alternating")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per library first")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0: every core this process may use")
    parser.add_argument("--no-pad", action="store_true", help="full-length captions: no padding mask for vlfm")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto", help="vlfm's train.precision")
    parser.add_argument("--compile", action="store_true", help="vlfm with train.compile (its blocks compiled in warm-up)")
    args = parser.parse_args()

    D.update(SIZES[args.size])
    args.batch_size = args.batch_size or (128 if args.size == "tiny" else 16)
    threads = args.threads or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    vlfm_model = build_vlfm()
    if args.compile:
        compile_blocks(vlfm_model)
    torch.manual_seed(0)
    with warnings.catch_warnings(record=True) as caught:  # show, once, anything open_clip warns about
        warnings.simplefilter("always")
        from open_clip.loss import ClipLoss

        oc_model = build_open_clip()
    for warning in caught:
        print(f"open_clip warning: {warning.category.__name__}: {warning.message}")
    oc_loss = ClipLoss()

    pixels, vlfm_ids, mask, oc_ids = make_batch(args.batch_size, pad=not args.no_pad)
    cpu = torch.device("cpu")
    precision = resolve_precision(args.precision, cpu)

    def vlfm_loss():
        with autocast(cpu, precision):  # as the trainer does: the loss itself in fp32
            image, text, scale, _ = vlfm_model(pixels, vlfm_ids, mask)
        return clip_loss(image.float(), text.float(), scale)

    torch.manual_seed(0)
    oc_bf16 = build_open_clip()  # a copy of its own, with its own optimizer

    def oc_loss_in(model: torch.nn.Module, bf16: bool):
        def loss():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = model(pixels, oc_ids)
            return oc_loss(out["image_features"].float(), out["text_features"].float(), out["logit_scale"])

        return loss

    steps = {"vlfm": make_step(vlfm_model, vlfm_loss), "open_clip": make_step(oc_model, oc_loss_in(oc_model, False)),
             "open_clip bf16": make_step(oc_bf16, oc_loss_in(oc_bf16, True))}
    counts = {name: sum(p.numel() for p in model.parameters()) for name, model in
              (("vlfm", vlfm_model), ("open_clip", oc_model), ("open_clip bf16", oc_bf16))}

    print(f"torch {torch.__version__}, {threads} threads, {args.size}, batch {args.batch_size}, vlfm {precision} "
          f"(--precision {args.precision}{', compiled blocks' if args.compile else ''}), AdamW, "
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

    print(f"{'':15} {'params':>11} {'loss':>7} {'median/s':>9} {'min/s':>8} {'max/s':>8}")
    for name in steps:
        s = samples[name]
        print(f"{name:15} {counts[name]:>11,} {losses[name]:>7.3f} {statistics.median(s):>9.1f} {min(s):>8.1f} {max(s):>8.1f}")
    difference = counts["vlfm"] / counts["open_clip"] - 1
    if abs(difference) > 0.05:
        print(f"WARNING: parameter counts differ by {difference:+.1%}: the two configs do not match")
    for peer in ("open_clip", "open_clip bf16"):
        print(f"ratio vlfm/{peer}: {statistics.median(samples['vlfm']) / statistics.median(samples[peer]):.2f}")


if __name__ == "__main__":
    main()
