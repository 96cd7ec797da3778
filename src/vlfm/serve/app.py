"""The FastAPI application: its state, the error handlers (every refusal is `{"error": {"message", "type"}}`),
the body-size limit, the API key, metrics, health and the web page."""

from __future__ import annotations

import secrets
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException

from vlfm.io import VlfmError
from vlfm.serve.batcher import Batcher
from vlfm.serve.limits import FLAGS, Limits, ServeError
from vlfm.serve.metrics import Metrics

STATIC = Path(__file__).parent / "static"
HTTP_TYPES = {401: "authentication_error", 404: "not_found_error", 405: "method_not_allowed", 413: "limit_exceeded",
              415: "unsupported_media_type"}  # fmt: skip


@dataclass
class Server:
    """What the routes share: the models, the index (opened on the batcher's thread, which owns its SQLite
    connection), the limits, the key, the batcher and the metrics."""

    model: object
    name: str
    limits: Limits
    batcher: Batcher
    metrics: Metrics
    vlm: object | None = None
    vlm_name: str | None = None
    index: object | None = None
    api_key: str | None = field(default=None, repr=False)


def create_app(model, name: str = "model", index: str | Path | None = None, vlm=None, vlm_name: str | None = None,
               limits: Limits | None = None, api_key: str | None = None, max_batch: int = 32,
               max_wait: float = 0.005, cors_origins: list[str] | None = None) -> FastAPI:  # fmt: skip
    """An app serving `model` (a two-tower model), optionally an index it built and an assistant `vlm`.
    A SearchError (not an index, another model's index) is raised here, before anything is served."""
    from vlfm.serve import api, chat

    model.eval()
    if vlm is not None:
        vlm.eval()
    metrics = Metrics()
    batcher = Batcher(model, max_batch, max_wait, metrics.observe_batch)
    server = Server(model, name, limits or Limits(), batcher, metrics, vlm, vlm_name, api_key=api_key)
    batcher.start()
    if index is not None:
        try:
            server.index = batcher.call_sync(_open_index, index, model)
        except BaseException:
            batcher.stop()
            raise

    @asynccontextmanager
    async def lifespan(app):
        batcher.start()
        yield
        batcher.stop()

    # FastAPIOffline: /docs and /redoc from files shipped in the package (FastAPI's own load them from a CDN)
    app = FastAPIOffline(title="vlfm", summary="Embeddings, zero-shot classification, search and chat over vlfm models.",
                  version="1", lifespan=lifespan)  # fmt: skip
    app.state.server = server
    _install_error_handlers(app)
    app.add_middleware(metrics.middleware)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])  # fmt: skip
    app.add_middleware(BodyLimit, limit=server.limits.max_body_bytes)
    app.include_router(api.router, dependencies=[Depends(authorize)])
    app.include_router(chat.router, dependencies=[Depends(authorize)])
    _add_plain_routes(app, server)
    return app


def _open_index(path, model):
    from vlfm.search import SearchIndex

    index = SearchIndex.open(path)
    index.check_model(model)
    return index


def get_server(request: Request) -> Server:
    return request.app.state.server


def authorize(request: Request) -> None:
    """With an API key, every /v1 route needs `Authorization: Bearer KEY`."""
    key = get_server(request).api_key
    if key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(given.strip().encode(), key.encode()):
        raise ServeError(401, "this server needs an API key: send the header 'Authorization: Bearer KEY'",
                         "authentication_error")  # fmt: skip


def _add_plain_routes(app: FastAPI, server: Server) -> None:
    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/healthz", summary="liveness and what this server serves")
    async def healthz():
        return {"status": "ok", "model": server.name, "search": server.index is not None, "chat": server.vlm is not None,
                "auth": server.api_key is not None}  # fmt: skip

    @app.get("/metrics", summary="Prometheus metrics (text format)")
    async def metrics():
        return server.metrics.response()


def error_response(status: int, message: str, type: str, headers: dict | None = None) -> JSONResponse:
    """The one error shape; the x-vlfm-error header tells the metrics middleware the type."""
    return JSONResponse({"error": {"message": message, "type": type}}, status,
                        headers={**(headers or {}), "x-vlfm-error": type})  # fmt: skip


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServeError)
    async def refused(request, error: ServeError):
        return error_response(error.status, error.message, error.type)

    @app.exception_handler(VlfmError)
    async def vlfm_error(request, error: VlfmError):  # e.g. the index refusing a query
        return error_response(400, str(error), "invalid_request_error")

    @app.exception_handler(RequestValidationError)
    async def invalid(request, error: RequestValidationError):
        return error_response(422, validation_message(error.errors()), "invalid_request_error")

    @app.exception_handler(HTTPException)
    async def http_error(request, error: HTTPException):
        return error_response(error.status_code, str(error.detail), HTTP_TYPES.get(error.status_code, "invalid_request_error"),
                              getattr(error, "headers", None))  # fmt: skip

    @app.exception_handler(Exception)
    async def bug(request, error: Exception):  # a bug, not a user's mistake: still JSON, never a traceback
        return error_response(500, f"internal error ({type(error).__name__}); the server goes on serving", "server_error")


def validation_message(errors) -> str:
    """Pydantic's errors as one line: `body.input: Field required; body.k: ...` (the first five)."""
    parts = []
    for e in list(errors)[:5]:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        parts.append(f"{where}: {e.get('msg', 'invalid')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "; ".join(parts) + more


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes is refused with 413 before the app sees it (a
    declared Content-Length at once; a chunked body once it passes the limit, buffered up to it)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await self._refuse(scope, send, f"{int(declared):,} bytes" if declared.isdigit() else "unreadable length")
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return await self.app(scope, _replay([message]), send)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._refuse(scope, send, f"more than {self.limit:,} bytes")
            more = message.get("more_body", False)
        replay = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]
        await self.app(scope, _replay(replay, receive), send)

    async def _refuse(self, scope, send, found: str) -> None:
        message = f"the request body is {found}, over the limit of {self.limit:,} bytes (the server's {FLAGS['max_body_bytes']})"
        await error_response(413, message, "limit_exceeded")(scope, _replay([]), send)


def _replay(messages: list[dict], then=None):
    async def receive():
        if messages:
            return messages.pop(0)
        return await then() if then is not None else {"type": "http.disconnect"}

    return receive
