"""`vlfm serve`: an HTTP API (OpenAI-shaped embeddings and chat, zero-shot classification, search) and one web
page over a two-tower model, optionally an index it built and an assistant. `create_app` builds the FastAPI app;
`vlfm serve` (cli/serve.py) runs it under uvicorn."""

from vlfm.serve.limits import Limits, ServeError

__all__ = ["Limits", "ServeError", "create_app"]


def __getattr__(name: str):
    # FastAPI is an extra (.[serve]): `vlfm --help` reads the limits' defaults and must not need it
    if name == "create_app":
        from vlfm.serve.app import create_app

        return create_app
    raise AttributeError(f"module 'vlfm.serve' has no attribute {name!r}")
