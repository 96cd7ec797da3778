"""`vlfm serve`: the HTTP API and web page (vlfm.serve) under uvicorn."""

from __future__ import annotations

import os
from pathlib import Path

from vlfm.cli.common import add_precision, non_negative_float, positive_int, two_tower
from vlfm.io import UsageError


def add_serve(p) -> None:
    from vlfm.serve.limits import FLAGS, Limits

    p.add_argument("checkpoint", help="the image-text model to serve (embeddings, classify, search queries)")
    add_precision(p)
    p.add_argument("--index", help="an index built by this model (`vlfm index build`): /v1/search and the Search tab")
    p.add_argument("--vlm", help="an assistant checkpoint: /v1/chat/completions and the Chat tab")
    p.add_argument("--host", default="127.0.0.1", help="the address to bind (default: loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("VLFM_API_KEY"),
                   help="every /v1 route then needs 'Authorization: Bearer KEY' (default: $VLFM_API_KEY)")
    p.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                   help="allow browser pages from ORIGIN to call the API (repeatable; default: none)")
    p.add_argument("--max-batch", type=positive_int, default=32, help="encoder items one forward pass may share (1: no batching)")
    p.add_argument("--max-wait-ms", type=non_negative_float, default=5.0,
                   help="how long the first item of a batch waits for others (milliseconds)")
    for name, flag in FLAGS.items():  # the flags the server's errors name
        default = getattr(Limits, name)
        p.add_argument(flag, type=positive_int, default=default, metavar="N", help=f"limit (default {default:_})")


def serve_command(args) -> None:
    from vlfm.checkpoint import load
    from vlfm.models import VisionLanguageModel
    from vlfm.serve.limits import FLAGS, Limits

    try:
        import uvicorn

        from vlfm.serve import create_app
    except ImportError as error:
        raise UsageError(f"vlfm serve needs its extra ({error.name} is not installed): pip install -e '.[serve]'") from None

    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port} is not a port (0-65535)")
    model = two_tower(load(args.checkpoint, precision=args.precision), "serve")
    vlm = load(args.vlm) if args.vlm else None
    if vlm is not None and not isinstance(vlm, VisionLanguageModel):
        raise UsageError(f"--vlm needs a vision-language model; {args.vlm} is a {type(vlm).__name__}")
    limits = Limits(**{name: getattr(args, name) for name in FLAGS})
    app = create_app(model, Path(args.checkpoint).name, args.index, vlm, args.vlm and Path(args.vlm).name, limits,
                     args.api_key, args.max_batch, args.max_wait_ms / 1000, args.cors_origin)  # fmt: skip
    print(f"vlfm serve: http://{args.host}:{args.port}/ (API: /docs)", flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
