"""Peak memory and tokens/s of one stage-2 VLM training step: full fine-tuning against LoRA, with and without
gradient checkpointing, on the same model and the same batch.

Variants (set up as train/vlm.py's stage 2 does it: `set_trainable`, `parameter_groups`, AdamW):
  full        projector + every LM weight trained
  lora        projector + LoRA adapters (rank `--lora-rank`) on every LM Linear; LM weights frozen
  lora+ckpt   lora, plus model.set_grad_checkpointing(True): each LM block is recomputed in backward
The vision tower is frozen in all three (stage 2's default). A step is forward, next-token loss, backward,
gradient clipping and an AdamW step, under `--precision` (fp32, or bf16 autocast with fp32 weights as the
trainer runs it). The model has random weights and no tokenizer: each row is a bos token, the image's
placeholder tokens (model.config.image_token_id = 3) and random text ids; the loss is taken on the text only.

Memory. Each variant runs in a fresh subprocess, so no allocator cache or optimizer state carries over. After
the model, optimizer and batch are built, the peak is reset and the current use recorded ("start"); the
peak is read after `--warmup` + `--steps` steps (AdamW's state is created in the first step, so it counts).
  cuda  torch.cuda.max_memory_allocated / memory_allocated: bytes held by live tensors (not the CUDA
        context, not the caching allocator's spare blocks).
  cpu   VmHWM / VmRSS of /proc/self/status: the process's peak and current resident memory, peak reset by
        writing 5 to /proc/self/clear_refs (Linux only), so the Python/torch runtime (~0.3 GiB) is included.
        The child runs with MALLOC_MMAP_THRESHOLD_=65536 (unless set already): glibc then maps every block
        of 64 KiB or more on its own and unmaps it when freed, so RSS follows live tensors; with glibc's
        default heap, freed activations stay resident and "above start" came out ~2x higher for LoRA +
        checkpointing. ru_maxrss is not used: after exec it keeps the parent's peak and cannot be reset.
"peak" is the whole process (weights included: what must fit on the device); "above start" is peak minus
start: gradients, AdamW state, activations, logits and temporaries. "grads+AdamW" is computed, not measured:
3 x the trainable parameters' bytes (gradient, exp_avg, exp_avg_sq). tokens/s counts every position of the
batch (image tokens included) over the `--steps` timed steps. The numbers are printed only.

    .venv/bin/python bench/vlm_memory.py --device cpu     # about 6 minutes on 2 cores (make bench-vlm)
    python bench/vlm_memory.py --device cuda --precision bf16 --batch-size 16 --seq-len 1024 --steps 10
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from vlfm.config import LMConfig, StageConfig, TrainConfig, VisionConfig, VLMConfig
from vlfm.models.vlm import VisionLanguageModel
from vlfm.nn import autocast
from vlfm.train.loop import parameter_groups
from vlfm.train.vlm import next_token_loss, set_trainable

VARIANTS = ("full", "lora", "lora+ckpt")
BOS, IMAGE_TOKEN_ID = 1, 3  # pad 0, bos 1, eos 2 (LMConfig's defaults); text ids are drawn above 3
MIB = 2**20


def build_model(args) -> VisionLanguageModel:
    """Llama-style LM (head_dim 64, 4 query heads per kv head, SwiGLU ~8/3 x width) behind a CLIP-style ViT."""
    heads = args.width // 64
    lm = LMConfig(vocab_size=args.vocab, width=args.width, layers=args.layers, heads=heads, kv_heads=max(1, heads // 4),
                  mlp_width=-(-8 * args.width // 3 // 256) * 256, max_positions=max(1024, args.seq_len))
    vision = VisionConfig(image_size=args.image_size, patch_size=args.patch_size, width=args.vision_width,
                          layers=args.vision_layers, heads=args.vision_width // 64, class_token=True, pool="cls",
                          pre_norm=True)
    torch.manual_seed(0)  # every variant starts from the same weights
    return VisionLanguageModel(VLMConfig(vision=vision, lm=lm, image_token_id=IMAGE_TOKEN_ID))


def make_batch(model: VisionLanguageModel, batch_size: int, seq_len: int) -> dict[str, torch.Tensor]:
    """One image per row at positions 1..image_tokens, random text after it; labels on the text only."""
    image_tokens = model.image_tokens
    if seq_len < image_tokens + 2:
        raise SystemExit(f"--seq-len {seq_len} cannot hold the {image_tokens} image tokens and any text")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(IMAGE_TOKEN_ID + 1, model.config.lm.vocab_size, (batch_size, seq_len), generator=g)
    ids[:, 0], ids[:, 1:1 + image_tokens] = BOS, IMAGE_TOKEN_ID
    labels = ids.clone()
    labels[:, :1 + image_tokens] = -100
    size = model.config.vision.image_size
    pixels = torch.randn(batch_size, 3, size, size, generator=g)
    return {"ids": ids, "labels": labels, "mask": torch.ones_like(ids), "pixels": pixels}


class Memory:
    """Current and peak memory in bytes on one device, with a peak that can be reset (see the module doc)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        else:
            Path("/proc/self/clear_refs").write_text("5")

    def current(self) -> int:
        return torch.cuda.memory_allocated() if self.cuda else _proc_status_kib("VmRSS") * 1024

    def peak(self) -> int:
        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated()
        return _proc_status_kib("VmHWM") * 1024


def _proc_status_kib(field: str) -> int:
    return int(re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


def measure(variant: str, args) -> dict:
    """Build, set up and time one variant in this process; memory is measured from after the build."""
    device = torch.device(args.device)
    model = build_model(args).to(device)
    stage = StageConfig(lr=2e-4, lora_rank=0 if variant == "full" else args.lora_rank)
    lr_mults = set_trainable(model, 2, stage)
    model.set_grad_checkpointing(variant == "lora+ckpt")
    model.train()
    train = TrainConfig(precision=args.precision)
    optimizer = torch.optim.AdamW(parameter_groups(model, train, lr_mults), lr=stage.lr, betas=train.betas, eps=train.eps)
    batch = {k: v.to(device) for k, v in make_batch(model, args.batch_size, args.seq_len).items()}
    trainable = [p for p in model.parameters() if p.requires_grad]

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, args.precision):
            loss = next_token_loss(model, batch["ids"], batch["labels"], batch["mask"], batch["pixels"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, train.clip_grad)
        optimizer.step()
        return loss.item()

    memory = Memory(device)
    gc.collect()
    start = memory.current()
    memory.reset_peak()
    first_loss = step()
    for _ in range(args.warmup - 1):
        step()
    tick = time.perf_counter()
    for _ in range(args.steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - tick
    peak = memory.peak()
    return {"variant": variant, "trainable_params": sum(p.numel() for p in trainable),
            "total_params": sum(p.numel() for p in model.parameters()),
            "image_tokens": model.image_tokens, "first_loss": first_loss,
            "start_mib": start / MIB, "peak_mib": peak / MIB, "above_start_mib": (peak - start) / MIB,
            "grads_adamw_mib": 3 * sum(p.numel() * p.element_size() for p in trainable) / MIB,
            "tokens_per_s": args.steps * args.batch_size * args.seq_len / elapsed, "step_s": elapsed / args.steps,
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def run_fresh(variant: str) -> dict:
    """`measure` in a new interpreter (same flags plus --only, glibc mapping large blocks: see the module
    doc), its result read from its last stdout line."""
    env = {"MALLOC_MMAP_THRESHOLD_": "65536", **os.environ}
    out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--only", variant], capture_output=True, text=True,
                         env=env)
    if out.returncode:
        sys.stderr.write(out.stderr)
        raise SystemExit(f"variant {variant} failed (exit {out.returncode})")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="bf16: autocast, fp32 weights")
    parser.add_argument("--steps", type=int, default=1, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (>= 1: allocates AdamW state)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512, help="tokens per row, the image's included")
    parser.add_argument("--width", type=int, default=1024, help="LM width (a multiple of 64)")
    parser.add_argument("--layers", type=int, default=12, help="LM blocks")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--vision-width", type=int, default=768)
    parser.add_argument("--vision-layers", type=int, default=12)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0: torch's default")
    parser.add_argument("--json", type=Path, help="write the settings and results here")
    parser.add_argument("--only", choices=VARIANTS, help="measure one variant in this process, print it as JSON")
    args = parser.parse_args()
    if args.warmup < 1 or args.steps < 1:
        parser.error("--warmup and --steps must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.only:
        print(json.dumps(measure(args.only, args)))
        return

    results = []
    for variant in VARIANTS:
        results.append(run_fresh(variant))
        r = results[-1]
        if variant == "full":
            print(f"torch {r['torch']}, {args.device}, {r['threads']} threads, {args.precision}; "
                  f"{r['total_params'] / 1e6:.0f}M parameters; batch {args.batch_size} x {args.seq_len} tokens "
                  f"({r['image_tokens']} image tokens per row); {args.warmup} warmup + {args.steps} timed steps")
            logits = args.batch_size * args.seq_len * args.vocab * 4 / MIB
            print(f"memory: {'allocated tensors' if args.device == 'cuda' else 'process RSS'}, MiB; "
                  f"start = after building model, optimizer and batch ({r['start_mib']:.0f} MiB); "
                  f"one fp32 logits tensor (batch x seq x vocab) = {logits:.0f} MiB")
            print(f"{'variant':10} {'trainable':>11} {'peak':>7} {'x full':>6} {'above start':>11} {'x full':>6} "
                  f"{'grads+AdamW':>11} {'loss':>7} {'tokens/s':>9} {'x full':>6}")
        full = results[0]
        print(f"{variant:10} {r['trainable_params']:>11,} {r['peak_mib']:>7.0f} {r['peak_mib'] / full['peak_mib']:>6.2f} "
              f"{r['above_start_mib']:>11.0f} {r['above_start_mib'] / full['above_start_mib']:>6.2f} "
              f"{r['grads_adamw_mib']:>11.0f} {r['first_loss']:>7.3f} {r['tokens_per_s']:>9.0f} "
              f"{r['tokens_per_s'] / full['tokens_per_s']:>6.2f}", flush=True)
    if args.json:
        settings = {k: v for k, v in vars(args).items() if k not in ("json", "only")}
        args.json.write_text(json.dumps({"settings": settings, "results": results}, indent=2))


if __name__ == "__main__":
    main()
