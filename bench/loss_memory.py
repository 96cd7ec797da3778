"""Peak memory and time of one forward + backward of the full and the chunked CLIP / SigLIP losses.

Each measurement runs in a fresh subprocess, so one run's peak cannot hide another's:
- CPU: the peak is the process's resident-set high-water mark (getrusage ru_maxrss) during the loss, minus the
  resident set just before it (inputs allocated, torch warmed up on a tiny batch). torch has no peak counter
  for CPU memory and tracemalloc does not see its allocations, but RSS is what the machine actually gives the
  process. glibc would keep freed blocks under its (adaptive, up to 32 MiB) mmap threshold in the heap and so
  in the RSS; MALLOC_MMAP_THRESHOLD_ fixes it at 1 MiB in the subprocess, so every block of 1 MiB or more is
  mapped and unmapped on its own and the RSS follows what is live.
- CUDA: torch.cuda.max_memory_allocated minus the memory allocated before the loss.
Both include what any loss step holds: the input features' gradients (B x D). Time: the best of --repeats
runs. Keys repeat (caption ids drawn from B/2 values), as in training with train.multi_positive.

    .venv/bin/python bench/loss_memory.py --batch-sizes 4096 8192 16384 --dim 512
    .venv/bin/python bench/loss_memory.py --device cuda --batch-sizes 16384 32768 65536
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from vlfm.losses import clip_loss, clip_loss_chunked, siglip_loss, siglip_loss_chunked


def make_step(loss: str, variant: str, batch: int, dim: int, chunk: int, device: torch.device):
    """Inputs of one batch, and a function doing one forward + backward on them."""
    generator = torch.Generator(device).manual_seed(0)
    image, text = (torch.nn.functional.normalize(torch.randn(batch, dim, device=device, generator=generator), dim=-1)
                   .requires_grad_() for _ in range(2))
    keys = torch.randint(0, max(1, batch // 2), (batch,), device=device, generator=generator)
    scale = torch.tensor(10.0, device=device, requires_grad=True)
    bias = torch.tensor(-10.0, device=device, requires_grad=True)

    def step():
        if loss == "clip":
            value = clip_loss(image, text, scale, keys=keys) if variant == "full" else clip_loss_chunked(
                image, text, scale, keys, chunk_size=chunk)
        else:
            value = siglip_loss(image, text, scale, bias, keys=keys) if variant == "full" else siglip_loss_chunked(
                image, text, scale, bias, keys, chunk_size=chunk)
        value.backward()
        for x in (image, text, scale, bias):
            x.grad = None

    return step


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def measure(loss: str, variant: str, batch: int, dim: int, chunk: int, device_name: str, repeats: int) -> dict:
    """In the subprocess: the peak of the first run, then the best time of `repeats` runs."""
    device = torch.device(device_name)
    make_step(loss, variant, 256, dim, 64, device)()  # one-time costs (imports, kernels) before the baseline
    step = make_step(loss, variant, batch, dim, chunk, device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resident_bytes()
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        step()
        synchronize()
        times.append(time.perf_counter() - start)
        if len(times) == 1:
            peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
                    else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"peak_mib": (peak - base) / 2**20, "seconds": min(times)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4096, 8192, 16384])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--child", nargs=3, metavar=("LOSS", "VARIANT", "BATCH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        loss, variant, batch = args.child
        print(json.dumps(measure(loss, variant, int(batch), args.dim, args.chunk_size, args.device, args.repeats)))
        return

    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(2**20)}
    common = ["--dim", str(args.dim), "--chunk-size", str(args.chunk_size), "--device", args.device,
              "--repeats", str(args.repeats), "--threads", str(args.threads)]
    print(f"device={args.device} dim={args.dim} chunk={args.chunk_size} threads={args.threads} torch={torch.__version__}")
    print(f"{'loss':<7}{'batch':>7}{'B x B fp32 MiB':>16}{'full MiB':>11}{'chunked MiB':>13}{'ratio':>7}"
          f"{'full s':>9}{'chunked s':>11}")
    for loss in ("clip", "siglip"):
        for batch in args.batch_sizes:
            result = {}
            for variant in ("full", "chunked"):
                out = subprocess.run([sys.executable, __file__, "--child", loss, variant, str(batch), *common],
                                     env=env, capture_output=True, text=True)
                if out.returncode:
                    sys.exit(f"{loss} {variant} {batch} failed:\n{out.stderr}")
                result[variant] = json.loads(out.stdout.strip().splitlines()[-1])
            full, chunked = result["full"], result["chunked"]
            print(f"{loss:<7}{batch:>7}{batch * batch * 4 / 2**20:>16.0f}{full['peak_mib']:>11.0f}"
                  f"{chunked['peak_mib']:>13.0f}{full['peak_mib'] / chunked['peak_mib']:>7.1f}"
                  f"{full['seconds']:>9.2f}{chunked['seconds']:>11.2f}", flush=True)


if __name__ == "__main__":
    main()
