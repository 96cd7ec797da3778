"""`vlfm serve` under load on loopback: micro-batching on (--max-batch 32, --max-wait-ms 5) against off
(--max-batch 1), the same server process setup, model, requests and client in one run.

The model is the shapes-clip preset's architecture (configs/shapes-clip.yaml: 64-px images, 128-wide towers),
random weights (speed does not depend on them), with a tokenizer trained on the world's captions. Each server is
a real `vlfm serve` process on one thread (OMP_NUM_THREADS=1); `--clients` asyncio clients (httpx) each send
`--requests` requests one after another: /v1/embeddings with one caption (text) or one 64-px PNG data URL
(image). Reported per workload and setting: requests/s over the timed requests, p50 / p99 latency, errors (any
non-200), the mean batch size from the server's /metrics and the CPU time per request of the server process (from
/proc: what serving costs apart from the client) and of the clients' process; then the throughput ratio on / off. The order of
the settings flips every round (`--rounds`) and the best round counts, so load from other processes hits both.
Numbers are printed only: a speed is never a test assertion.

    .venv/bin/python bench/serve.py                       # 32 clients x 20 requests, 2 rounds: a few minutes
    .venv/bin/python bench/serve.py --requests 5 --rounds 1   # a quick look
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"on": ["--max-batch", "32", "--max-wait-ms", "5"], "off": ["--max-batch", "1", "--max-wait-ms", "0"]}


def make_model(directory: Path) -> tuple[list[str], list[str]]:
    """The preset's architecture saved to `directory`; some captions and PNG data URLs of world scenes."""
    from vlfm.config import load_config
    from vlfm.data.shapes import ShapesWorld
    from vlfm.data.tokenizer import Tokenizer
    from vlfm.data.world_text import captions
    from vlfm.models import TwoTowerModel

    config = load_config(ROOT / "configs" / "shapes-clip.yaml")
    world = ShapesWorld(config.data.world)
    scenes = [world.scene("val", i) for i in range(64)]
    texts = [c for s in scenes for c in captions(s)]
    torch.manual_seed(0)
    model = TwoTowerModel(config.model, Tokenizer.train(texts * 4, vocab_size=config.model.text.vocab_size))
    model.save(directory)
    urls = []
    for scene in scenes:
        out = io.BytesIO()
        world.render(scene).save(out, "PNG")
        urls.append("data:image/png;base64," + base64.b64encode(out.getvalue()).decode())
    return texts[:64], urls


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: Path, setting: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    process = subprocess.Popen([sys.executable, "-m", "vlfm.cli", "serve", str(model), "--port", str(port), *SETTINGS[setting]],
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return process, url
        except httpx.HTTPError:
            time.sleep(0.1)
    process.kill()
    raise SystemExit(f"vlfm serve ({setting}) did not start")


async def load(url: str, pid: int, inputs: list[str], clients: int, requests: int):
    """(seconds, the server's and the clients' CPU seconds, latencies, errors) of `clients` concurrent clients
    sending `requests` requests each (timed after a warm-up round of as many)."""
    latencies, errors = [], 0

    async def client(c: int, http: httpx.AsyncClient) -> None:
        nonlocal errors
        for r in range(requests):
            body = {"input": inputs[(c * requests + r) % len(inputs)]}
            start = time.perf_counter()
            try:
                ok = (await http.post(f"{url}/v1/embeddings", json=body)).status_code == 200
            except httpx.HTTPError:  # a dropped connection counts as an error too
                ok = False
            latencies.append(time.perf_counter() - start)
            errors += not ok

    # idle connections are dropped before uvicorn's 5 s keep-alive ends, so none is closed under a request
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients, keepalive_expiry=2.0)
    async with httpx.AsyncClient(limits=limits, timeout=120) as http:
        await asyncio.gather(*(client(c, http) for c in range(clients)))  # warm-up: connections, first passes
        latencies.clear()
        start, cpu, own = time.perf_counter(), cpu_seconds(pid), time.process_time()
        await asyncio.gather(*(client(c, http) for c in range(clients)))
        return time.perf_counter() - start, cpu_seconds(pid) - cpu, time.process_time() - own, latencies, errors


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def mean_batch(url: str, kind: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    total = float(re.search(rf'vlfm_batch_size_sum{{kind="{kind}"}} (\S+)', text)[1])
    count = float(re.search(rf'vlfm_batch_size_count{{kind="{kind}"}} (\S+)', text)[1])
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=20, help="timed requests per client (after as many warm-up)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        texts, urls = make_model(Path(tmp) / "model")
        results = {}
        for workload, inputs in (("text", texts), ("image", urls)):
            for round_ in range(args.rounds):
                for setting in ("on", "off") if round_ % 2 == 0 else ("off", "on"):
                    process, url = start_server(Path(tmp) / "model", setting)
                    try:
                        seconds, cpu, client_cpu, latencies, errors = asyncio.run(load(url, process.pid, inputs, args.clients, args.requests))
                        batch = mean_batch(url, workload)
                    finally:
                        process.terminate()
                        process.wait()
                    row = {"workload": workload, "batching": setting, "round": round_, "requests": len(latencies),
                           "req_per_s": round(len(latencies) / seconds, 1), "p50_ms": round(1000 * float(np.percentile(latencies, 50)), 1),
                           "p99_ms": round(1000 * float(np.percentile(latencies, 99)), 1), "errors": errors,
                           "mean_batch": round(batch, 2), "server_cpu_ms_per_req": round(1000 * cpu / len(latencies), 2),
                           "client_cpu_ms_per_req": round(1000 * client_cpu / len(latencies), 2)}  # fmt: skip
                    print(json.dumps(row), flush=True)
                    best = results.get((workload, setting))
                    if best is None or row["req_per_s"] > best["req_per_s"]:
                        results[(workload, setting)] = row
        for workload in ("text", "image"):
            on, off = results[(workload, "on")], results[(workload, "off")]
            print(f"{workload}: batching on {on['req_per_s']} req/s (p50 {on['p50_ms']} ms, p99 {on['p99_ms']} ms, batch "
                  f"{on['mean_batch']}) vs off {off['req_per_s']} req/s (p50 {off['p50_ms']} ms, p99 {off['p99_ms']} ms): "
                  f"{on['req_per_s'] / off['req_per_s']:.2f}x; errors {on['errors'] + off['errors']}")  # fmt: skip


if __name__ == "__main__":
    main()
