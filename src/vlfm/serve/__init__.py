"""`vlfm serve`: an HTTP API (OpenAI-shaped embeddings and chat, zero-shot classification, search) and one web
page over a two-tower model, optionally an index it built and an assistant. `create_app` builds the FastAPI app;
`vlfm serve` (cli/serve.py) runs it under uvicorn."""

from vlfm.serve.app import create_app
from vlfm.serve.limits import Limits, ServeError

__all__ = ["Limits", "ServeError", "create_app"]
