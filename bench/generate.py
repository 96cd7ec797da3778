"""Greedy generation of the assistant against transformers' LLaVA on the same weights, measured in one process.

One tiny random `transformers.LlavaForConditionalGeneration` (a CLIP vision tower and a Llama LM shaped like a
small real one, sizes below) is saved to a temporary directory and loaded into vlfm by `vlfm.load` (the
interop every user goes through). Both then answer the same prompt (bos, text, the image's 64 placeholder
tokens, text) about the same pixels: `model.generate(..., max_new_tokens=N, stop_tokens=[])` against
`generate(do_sample=False, max_new_tokens=N)` with no end token, so both always write N tokens, and the
token ids of the two are compared (a mismatch is printed loudly: the comparison would be void).

Timing: each round times, for each library, a 1-token generate (the prefill: vision tower, projector and the
prompt through the LM, plus one argmax) and an N-token one; the order of the libraries flips every round so
load from other processes hits both alike; medians are printed. tokens/s = batch x N / time of the
N-token generate (prefill included); decode ms/token = (t_N - t_1) / (N - 1), per step of the batch. "matmuls
alone" times one step's matrix products by themselves (each LM Linear and the head on the batch's rows): at
batch 1 on a CPU that is most of a step (reading the weights from memory), which neither library can go under.
fp32, eval mode, 1 thread unless --threads; each generate as a user calls it (transformers' runs under no_grad,
vlfm's under inference_mode). The numbers are printed only: a speed is never a test assertion.

    .venv/bin/python bench/generate.py                        # batch 1, 64 new tokens, 1 thread
    .venv/bin/python bench/generate.py --batch 1 8 --rounds 7
"""

from __future__ import annotations

import argparse
import logging
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
import transformers

import vlfm

VOCAB, IMAGE_TOKEN, BOS = 32064, 32000, 1  # LLaVA-1.5's vocabulary (Llama's 32,000 + <image> + padding)
IMAGE, PATCH = 112, 14  # 8 x 8 = 64 image tokens


def build_hf(args) -> transformers.LlavaForConditionalGeneration:
    vision = transformers.CLIPVisionConfig(hidden_size=384, intermediate_size=1536, num_hidden_layers=6,
                                           num_attention_heads=6, image_size=IMAGE, patch_size=PATCH)  # fmt: skip
    text = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=args.width, intermediate_size=args.width * 11 // 4,
                                    num_hidden_layers=args.layers, num_attention_heads=args.width // 64,
                                    num_key_value_heads=max(1, args.width // 256), max_position_embeddings=2048,
                                    rms_norm_eps=1e-5, bos_token_id=BOS, eos_token_id=2, pad_token_id=0)  # fmt: skip
    config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_TOKEN)
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(config)
    with torch.no_grad():  # larger than the 0.02 init, so the argmax is decisive and the two libraries' last-bit
        g = torch.Generator().manual_seed(0)  # differences cannot flip a token
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 / p.shape[-1] ** 0.5 if "embed" not in name else 1.0))
    return model.eval()


def prompt(batch: int, text: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, pixels): per row bos, `text` // 2 words, the image's 64 tokens, the other words; a random image."""
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(3, IMAGE_TOKEN, (batch, text), generator=g)
    image = torch.full((batch, (IMAGE // PATCH) ** 2), IMAGE_TOKEN)
    ids = torch.cat([torch.full((batch, 1), BOS), words[:, : text // 2], image, words[:, text // 2:]], dim=1)
    return ids, torch.randn(batch, 3, IMAGE, IMAGE, generator=g)


def runners(ours, theirs, ids, pixels):
    mask = torch.ones_like(ids)

    def run_vlfm(n: int) -> list[list[int]]:
        return ours.generate(ids, mask, pixels, max_new_tokens=n, stop_tokens=[])

    def run_transformers(n: int) -> list[list[int]]:
        out = theirs.generate(input_ids=ids, attention_mask=mask, pixel_values=pixels, max_new_tokens=n,
                              min_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)  # fmt: skip
        return out[:, ids.shape[1]:].tolist()

    return {"vlfm": run_vlfm, "transformers": run_transformers}


def matmul_floor(lm, batch: int):
    """One decoding step's matrix products alone (every Linear of the LM and the output head, on `batch` rows):
    reading the weights once per token is the floor under any library's decode ms/token."""
    weights = [m.weight for m in lm.modules() if isinstance(m, torch.nn.Linear)]
    weights += [lm.output_weight] if lm.lm_head is None else []
    inputs = {w.shape[1]: torch.randn(batch, 1, w.shape[1]) for w in weights}

    def run(n: int) -> None:
        for _ in range(n):
            for w in weights:
                F.linear(inputs[w.shape[1]], w)

    return run


def timed(run, n: int) -> float:
    start = time.perf_counter()
    run(n)
    return time.perf_counter() - start


def bench(ours, theirs, batch: int, args) -> None:
    ids, pixels = prompt(batch, args.text)
    runs = runners(ours, theirs, ids, pixels)
    floor = matmul_floor(ours.lm, batch)
    tokens = {name: run(args.new_tokens) for name, run in runs.items()}  # also the warm-up
    for run in runs.values():
        run(1)
    times = {name: {1: [], args.new_tokens: []} for name in runs}
    for r in range(args.rounds):
        for name in list(runs) if r % 2 == 0 else list(reversed(runs)):
            for n in (1, args.new_tokens):
                times[name][n].append(timed(runs[name], n))
        with torch.inference_mode():
            times.setdefault("floor", []).append(timed(floor, 8) / 8)
    n = args.new_tokens
    print(f"\nbatch {batch}: prompt {ids.shape[1]} tokens ({(IMAGE // PATCH) ** 2} image), {n} new tokens, "
          f"{args.rounds} rounds (medians)")  # fmt: skip
    print(f"{'':13} {'tokens/s':>9} {'prefill ms':>11} {'decode ms/token':>16} {'total ms':>9}")
    rate = {}
    floor = statistics.median(times.pop("floor"))
    for name, t in times.items():
        total, prefill = statistics.median(t[n]), statistics.median(t[1])
        rate[name] = batch * n / total
        print(f"{name:13} {rate[name]:>9.1f} {prefill * 1e3:>11.1f} {(total - prefill) / (n - 1) * 1e3:>16.2f} {total * 1e3:>9.1f}")
    print(f"{'matmuls alone':13} {'':>9} {'':>11} {floor * 1e3:>16.2f}   (the LM's weights read once per step)")
    same = tokens["vlfm"] == tokens["transformers"]
    if same:
        print(f"token ids: identical ({batch} x {n})")
    else:
        first = next(i for i, (a, b) in enumerate(zip(tokens["vlfm"][0], tokens["transformers"][0])) if a != b)
        print(f"!!! TOKEN IDS DIFFER (row 0 first at step {first}): the comparison is void !!!\n"
              f"vlfm         {tokens['vlfm'][0]}\ntransformers {tokens['transformers'][0]}")
    print(f"ratio vlfm/transformers tokens/s, batch {batch}: {rate['vlfm'] / rate['transformers']:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--text", type=int, default=24, help="text tokens of the prompt besides bos and the image")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--width", type=int, default=512, help="LM width (head_dim 64, kv heads width // 256)")
    parser.add_argument("--layers", type=int, default=8, help="LM blocks")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("vlfm").setLevel(logging.ERROR)  # no tokenizer / preprocessor: the bench passes ids and pixels
    theirs = build_hf(args)
    with tempfile.TemporaryDirectory() as tmp:
        theirs.save_pretrained(tmp)
        ours = vlfm.load(tmp)
    lm = ours.config.lm
    params = sum(p.numel() for p in ours.parameters())
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} thread(s), fp32; "
          f"LLaVA: CLIP ViT 384 wide x 6, {IMAGE} px / {PATCH} px patches; Llama {lm.width} wide x {lm.layers}, "
          f"{lm.heads} heads / {lm.kv_heads} kv, MLP {lm.mlp_width}, vocab {lm.vocab_size}; {params / 1e6:.1f} M parameters; "
          f"transformers attention: {theirs.config.text_config._attn_implementation}")  # fmt: skip
    for batch in args.batch:
        bench(ours, theirs, batch, args)


if __name__ == "__main__":
    main()
