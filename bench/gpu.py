"""One command for what only a GPU shows: CLIP training and encoding speed against open_clip and transformers,
the chunked SigLIP loss's memory at a very large batch, and the assistant's stage-2 tokens/s.

1. Training, ViT-B/16 CLIP (224 px, text 77 x 512, 12 + 12 layers) at batch 256, bf16 autocast with fp32
   weights, AdamW, the same batch for vlfm, open_clip's CLIP and transformers' CLIPModel (SDPA attention, GELU in
   all three). Timed blocks alternate between the libraries, the order flipping each round; the median block is
   reported. FLOPs of one step are counted by torch.utils.flop_counter (matmuls, convolutions, attention; forward
   and backward) on each model; MFU = counted FLOPs x steps/s / the peak (`--peak-tflops`; 989 dense bf16 for an
   H100/H200 SXM). Peak memory: torch.cuda.max_memory_allocated over a library's warm-up steps.
2. encode_image images/s at batch 512 (inference mode, bf16 autocast), the same three.
3. bench/loss_memory.py at batch 65,536 x 512 on the device (chunked and full CLIP / SigLIP losses).
4. bench/vlm_memory.py in bf16: stage-2 step memory and tokens/s (full, LoRA, LoRA + checkpointing).
A library that is not installed is skipped with a line saying so. Numbers are printed only.

    python bench/gpu.py                 # one H100/H200, under 5 minutes
    python bench/gpu.py --tiny          # the same code on the CPU with tiny dims: checks the script
On the lent H200 (torch, transformers, timm, torchvision there; not open_clip): carry wheels of open_clip_torch,
ftfy and wcwidth as the device README says, then `PYTHONPATH=src:/tmp/site python3 bench/gpu.py`.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from vlfm.config import ModelConfig, TextConfig, VisionConfig
from vlfm.losses import clip_loss
from vlfm.models.two_tower import TwoTowerModel

EOS = 2
B16 = dict(embed=512, image=224, patch=16, vwidth=768, vlayers=12, vheads=12, context=77, vocab=49408, twidth=512,
           tlayers=12, theads=8)
TINY = dict(embed=32, image=32, patch=8, vwidth=64, vlayers=2, vheads=2, context=16, vocab=1000, twidth=64, tlayers=2,
            theads=2)
HERE = Path(__file__).resolve().parent


def build_vlfm(d: dict) -> torch.nn.Module:
    return TwoTowerModel(ModelConfig(kind="clip", embed_dim=d["embed"], vision=VisionConfig(
        image_size=d["image"], patch_size=d["patch"], width=d["vwidth"], layers=d["vlayers"], heads=d["vheads"],
        class_token=True, pool="cls", pre_norm=True, patch_bias=False),
        text=TextConfig(vocab_size=d["vocab"], context_length=d["context"], width=d["twidth"], layers=d["tlayers"],
                        heads=d["theads"], causal=True, pool="eos", eos_token_id=EOS)))


def build_open_clip(d: dict) -> torch.nn.Module:
    import open_clip

    return open_clip.model.CLIP(
        embed_dim=d["embed"], output_dict=True,
        vision_cfg={"image_size": d["image"], "patch_size": d["patch"], "width": d["vwidth"], "layers": d["vlayers"],
                    "head_width": d["vwidth"] // d["vheads"]},
        text_cfg={"context_length": d["context"], "vocab_size": d["vocab"], "width": d["twidth"], "heads": d["theads"],
                  "layers": d["tlayers"]})


def build_transformers(d: dict) -> torch.nn.Module:
    from transformers import CLIPConfig, CLIPModel

    config = CLIPConfig(projection_dim=d["embed"], text_config=dict(
        vocab_size=d["vocab"], hidden_size=d["twidth"], intermediate_size=4 * d["twidth"], num_hidden_layers=d["tlayers"],
        num_attention_heads=d["theads"], max_position_embeddings=d["context"], hidden_act="gelu", bos_token_id=1, eos_token_id=EOS),
        vision_config=dict(hidden_size=d["vwidth"], intermediate_size=4 * d["vwidth"], num_hidden_layers=d["vlayers"],
                           num_attention_heads=d["vheads"], image_size=d["image"], patch_size=d["patch"], hidden_act="gelu"))
    return CLIPModel._from_config(config, attn_implementation="sdpa")


BUILDERS = {"vlfm": build_vlfm, "open_clip": build_open_clip, "transformers": build_transformers}


def make_batch(d: dict, batch: int, device: torch.device):
    """Pixels N(0,1) and full-length token rows ending in the end-of-text id (open_clip pools at the argmax id,
    so its copy carries the largest id there)."""
    g = torch.Generator().manual_seed(0)
    pixels = torch.randn(batch, 3, d["image"], d["image"], generator=g).to(device)
    ids = torch.randint(3, d["vocab"] - 1, (batch, d["context"]), generator=g)
    vlfm_ids, oc_ids = ids.clone(), ids.clone()
    vlfm_ids[:, -1], oc_ids[:, -1] = EOS, d["vocab"] - 1
    return pixels, vlfm_ids.to(device), oc_ids.to(device)


def loss_fn(name: str, model, batch):
    pixels, vlfm_ids, oc_ids = batch
    if name == "vlfm":
        return lambda: clip_loss(*model(pixels, vlfm_ids)[:3])
    if name == "open_clip":
        from open_clip.loss import ClipLoss

        loss = ClipLoss()
        return lambda: loss(**model(pixels, oc_ids))
    return lambda: model(input_ids=vlfm_ids, pixel_values=pixels, return_loss=True).loss


def train_step(model, loss, autocast):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, betas=(0.9, 0.98), eps=1e-6)
    model.train()

    def step():
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            value = loss()
        value.backward()
        optimizer.step()

    return step


def encode_step(name: str, model, pixels, autocast):
    encode = model.get_image_features if name == "transformers" else model.encode_image
    model.eval()

    def step():
        with torch.inference_mode(), autocast():
            encode(pixels)

    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def alternate(steps: dict, rounds: int, per_block: int, items: int, device: torch.device) -> dict[str, float]:
    """Median items/s of each over `rounds` timed blocks, the libraries interleaved and the order flipped."""
    rates = {name: [] for name in steps}
    for r in range(rounds):
        for name in (list(steps) if r % 2 == 0 else list(reversed(steps))):
            synchronize(device)
            start = time.perf_counter()
            for _ in range(per_block):
                steps[name]()
            synchronize(device)
            rates[name].append(per_block * items / (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in rates.items()}


def warm(step, count: int, device: torch.device) -> float:
    """Run untimed steps; the peak memory (GiB) they reach on a GPU."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(count):
        step()
    synchronize(device)
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")


def count_flops(step) -> int:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def compare(args, dims: dict, device: torch.device) -> None:
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.bf16 else nullcontext
    models = {}
    for name, build in BUILDERS.items():
        try:
            torch.manual_seed(0)
            models[name] = build(dims).to(device)
        except ImportError as error:
            print(f"{name}: skipped ({error})")
    batch = make_batch(dims, args.batch_size, device)
    steps, flops, peaks = {}, {}, {}
    for name, model in models.items():
        steps[name] = train_step(model, loss_fn(name, model, batch), autocast)
        peaks[name] = warm(steps[name], args.warmup, device)
        flops[name] = count_flops(steps[name])
    rates = alternate(steps, args.rounds, args.steps, args.batch_size, device)
    print(f"\n## training: batch {args.batch_size}, {'bf16 autocast' if args.bf16 else 'fp32'}, "
          f"{args.rounds} rounds x {args.steps} steps; peak {args.peak_tflops or 'n/a'} TFLOP/s")
    print(f"{'':13} {'params':>12} {'GFLOP/step':>11} {'samples/s':>10} {'MFU':>6} {'peak GiB':>9} {'vlfm x':>7}")
    for name, rate in rates.items():
        params = sum(p.numel() for p in models[name].parameters())
        mfu = flops[name] * rate / args.batch_size / (args.peak_tflops * 1e12) if args.peak_tflops else float("nan")
        print(f"{name:13} {params:>12,} {flops[name] / 1e9:>11.1f} {rate:>10.1f} {mfu:>6.1%} {peaks[name]:>9.2f} "
              f"{rates['vlfm'] / rate:>7.2f}")

    pixels = batch[0][:1].expand(args.encode_batch, -1, -1, -1).contiguous()
    encoders = {name: encode_step(name, model, pixels, autocast) for name, model in models.items()}
    for step in encoders.values():
        warm(step, args.warmup, device)
    rates = alternate(encoders, args.rounds, args.steps, args.encode_batch, device)
    print(f"\n## encode_image: batch {args.encode_batch}")
    for name, rate in rates.items():
        print(f"{name:13} {rate:>10.1f} images/s   vlfm x {rates['vlfm'] / rate:.2f}")


def run_bench(script: str, arguments: list[str]) -> None:
    print(f"\n## bench/{script} {' '.join(arguments)}", flush=True)
    result = subprocess.run([sys.executable, str(HERE / script), *arguments])
    if result.returncode:
        print(f"bench/{script} exited {result.returncode}")


def peak_for(device: torch.device) -> float:
    if device.type == "cuda" and any(chip in torch.cuda.get_device_name() for chip in ("H100", "H200")):
        return 989.0
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny dims on the CPU: checks the script, measures nothing")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--encode-batch", type=int, default=512)
    parser.add_argument("--steps", type=int, default=10, help="steps per timed block")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peak-tflops", type=float, help="the chip's dense bf16 peak; default: 989 on H100/H200")
    args = parser.parse_args()
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    if args.tiny:
        args.batch_size, args.encode_batch, args.steps, args.rounds, args.warmup = 8, 8, 1, 2, 1
    args.bf16 = device.type == "cuda"
    args.peak_tflops = args.peak_tflops if args.peak_tflops is not None else peak_for(device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
    compare(args, TINY if args.tiny else B16, device)
    if args.tiny:
        run_bench("loss_memory.py", ["--batch-sizes", "256", "--dim", "32", "--chunk-size", "64", "--repeats", "1",
                                     "--threads", "1"])
        run_bench("vlm_memory.py", ["--device", "cpu", "--width", "64", "--layers", "2", "--vocab", "500", "--seq-len",
                                    "48", "--image-size", "32", "--vision-width", "64", "--vision-layers", "2"])
    else:
        run_bench("loss_memory.py", ["--device", "cuda", "--batch-sizes", "65536", "--dim", "512", "--repeats", "1"])
        run_bench("vlm_memory.py", ["--device", "cuda", "--precision", "bf16", "--batch-size", "16", "--seq-len", "1024",
                                    "--steps", "5"])


if __name__ == "__main__":
    main()
