"""The encoder routes: /v1/embeddings (OpenAI's shape), /v1/classify, /v1/search and /v1/images/{id}."""

from __future__ import annotations

import base64
import mimetypes
from pathlib import Path as FilePath
from typing import Annotated, Literal

import numpy as np
from fastapi import APIRouter, Depends, Path, Request
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, Field, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from vlfm.serve.app import Server, get_server, validation_message
from vlfm.serve.limits import (
    ServeError,
    check_text,
    image_from_bytes,
    image_from_string,
    is_data_url,
    over_limit,
)

router = APIRouter()
ServerDep = Annotated[Server, Depends(get_server)]


class EmbeddingsRequest(BaseModel):
    input: str | list[str] = Field(description="a text, or a list of texts and images (data URLs, or base64 with "
                                               "modality=image)")  # fmt: skip
    model: str | None = Field(None, description="ignored: the server embeds with the model it was started with")
    modality: Literal["auto", "text", "image"] = Field("auto", description="auto: data URLs are images, the rest text")
    encoding_format: Literal["float", "base64"] = "float"


@router.post("/v1/embeddings", summary="normalised embeddings of texts and images (OpenAI's request and response)")
async def embeddings(body: EmbeddingsRequest, server: ServerDep):
    inputs = [body.input] if isinstance(body.input, str) else body.input
    limits = server.limits
    if not inputs:
        raise ServeError(400, "input is an empty list")
    over_limit(limits, "max_inputs", len(inputs), f"input has {len(inputs):,} items")
    size = server.model.preprocess_config.image_size
    kinds = ["image" if body.modality == "image" or (body.modality == "auto" and is_data_url(x)) else "text" for x in inputs]
    payloads = [image_from_string(x, limits, size, f"input[{i}]") if kind == "image" else check_text(limits, x, f"input[{i}]")
                for i, (x, kind) in enumerate(zip(inputs, kinds))]  # fmt: skip
    vectors = np.zeros((len(inputs), int(server.model.config.embed_dim)), dtype=np.float32)
    for kind in ("text", "image"):
        where = [i for i, k in enumerate(kinds) if k == kind]
        if where:
            vectors[where] = (await server.batcher.embed(kind, [payloads[i] for i in where])).numpy()
    tokens = sum(len(server.model.tokenizer.encode(p)) for p, k in zip(payloads, kinds) if k == "text")
    data = [{"object": "embedding", "index": i, "embedding": _encode(v, body.encoding_format)} for i, v in enumerate(vectors)]
    # a JSONResponse as is: FastAPI's encoder would walk every float of every vector again
    return JSONResponse({"object": "list", "model": server.name, "data": data,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})  # fmt: skip


def _encode(vector: np.ndarray, encoding: str):
    """OpenAI's encodings: a list of floats, or base64 of the little-endian float32 bytes."""
    return vector.tolist() if encoding == "float" else base64.b64encode(vector.astype("<f4").tobytes()).decode()


class ClassifyRequest(BaseModel):
    images: list[str] = Field(description="images as data URLs or base64")
    labels: list[str] = Field(description='the classes, e.g. ["a red circle", "a blue square"]')
    templates: list[str] | None = Field(None, description='prompts with {} for the label, e.g. ["a photo of {}"]')


CLASSIFY_BODY = {"content": {
    "application/json": {"schema": ClassifyRequest.model_json_schema()},
    "multipart/form-data": {"schema": {"type": "object", "required": ["image", "labels"], "properties": {
        "image": {"type": "array", "items": {"type": "string", "format": "binary"}, "description": "image files"},
        "labels": {"type": "array", "items": {"type": "string"}, "description": "repeated, or one comma-separated"},
        "templates": {"type": "array", "items": {"type": "string"}}}}},
}, "required": True}  # fmt: skip


@router.post("/v1/classify", summary="zero-shot: probabilities per label, ranked, for each image",
             openapi_extra={"requestBody": CLASSIFY_BODY})  # fmt: skip
async def classify(request: Request, server: ServerDep):
    images, labels, templates = await _classify_inputs(request, server)
    model = server.model
    image_vectors = await server.batcher.embed("image", images)
    label_vectors = await server.batcher.call(model.label_embeddings, labels, templates)
    logits = (await server.batcher.call(model.logits, image_vectors, label_vectors)).detach()
    probs = logits.softmax(dim=-1) if model.logit_bias is None else logits.sigmoid()  # as model.classify
    data = []
    for i, row in enumerate(probs.tolist()):
        ranked = sorted(zip(labels, row), key=lambda pair: -pair[1])
        data.append({"index": i, "labels": [{"label": label, "probability": p} for label, p in ranked]})
    activation = "softmax" if model.logit_bias is None else "sigmoid"
    return {"object": "list", "model": server.name, "activation": activation, "data": data}


async def _classify_inputs(request: Request, server: Server):
    """(images, labels, templates) from a JSON body or a multipart form, every one checked."""
    limits, size = server.limits, server.model.preprocess_config.image_size
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        try:
            body = ClassifyRequest.model_validate_json(await request.body())
        except ValidationError as error:
            raise ServeError(422, validation_message(error.errors())) from None
        over_limit(limits, "max_inputs", len(body.images), f"images has {len(body.images):,} items")
        images = [image_from_string(x, limits, size, f"images[{i}]") for i, x in enumerate(body.images)]
        labels, templates = body.labels, body.templates
    elif content_type == "multipart/form-data":
        form = await _form(request, limits)
        files = [f for key in ("image", "images") for f in form.getlist(key)]
        if any(not isinstance(f, UploadFile) for f in files):
            raise ServeError(400, "image must be a file upload (multipart), not a text field")
        over_limit(limits, "max_inputs", len(files), f"{len(files):,} images")
        try:
            images = [image_from_bytes(await f.read(), limits, size, f.filename or f"image {i}") for i, f in enumerate(files)]
        finally:
            await form.close()  # the uploads' spooled files
        labels = [str(x) for x in form.getlist("labels")]
        labels = [x.strip() for x in labels[0].split(",")] if len(labels) == 1 and "," in labels[0] else labels
        templates = [str(x) for x in form.getlist("templates")] or None
    else:
        raise ServeError(415, f"send application/json or multipart/form-data, not {content_type or 'no content type'}",
                         "unsupported_media_type")  # fmt: skip
    if not images:
        raise ServeError(400, "no images: send at least one")
    return images, _check_labels(limits, labels), _check_templates(limits, templates)


async def _form(request: Request, limits):
    try:
        return await request.form(max_files=limits.max_inputs + 1, max_fields=2 * limits.max_labels + 8)
    except HTTPException as error:  # a malformed or oversized form
        raise ServeError(400, f"the multipart form cannot be read: {error.detail}") from None


def _check_labels(limits, labels: list[str]) -> list[str]:
    if not labels:
        raise ServeError(400, "no labels: send at least one")
    over_limit(limits, "max_labels", len(labels), f"labels has {len(labels):,} items")
    return [check_text(limits, label, f"labels[{i}]") for i, label in enumerate(labels)]


def _check_templates(limits, templates: list[str] | None) -> list[str] | None:
    if templates is None:
        return None
    if not templates:
        raise ServeError(400, "templates is an empty list: leave it out, or give prompts such as 'a photo of {}'")
    over_limit(limits, "max_labels", len(templates), f"templates has {len(templates):,} items")
    for i, template in enumerate(templates):
        check_text(limits, template, f"templates[{i}]")
        try:
            ok = template.count("{}") == 1 and template.format("x") is not None
        except (IndexError, KeyError, ValueError):
            ok = False
        if not ok:
            raise ServeError(400, f"templates[{i}] {template!r} must hold exactly one {{}} (where the label goes) "
                                  "and no other braces")  # fmt: skip
    return templates


class SearchRequest(BaseModel):
    query: str | None = Field(None, description="a text query (text -> image)")
    image: str | None = Field(None, description="an image query, a data URL or base64 (image -> image)")
    k: int = Field(10, ge=1, description="number of hits")


@router.post("/v1/search", summary="the k indexed images nearest a text or an image: ids, scores, captions")
async def search(body: SearchRequest, server: ServerDep):
    index = server.index
    if index is None:
        raise ServeError(404, "this server has no index: start it with --index INDEX", "not_found_error")
    if (body.query is None) == (body.image is None):
        raise ServeError(400, "give query (a text) or image, not both and not neither")
    over_limit(server.limits, "max_k", body.k, f"k={body.k:,}")
    if body.query is not None:
        vector = await server.batcher.embed("text", [check_text(server.limits, body.query, "query")])
    else:
        image = image_from_string(body.image, server.limits, server.model.preprocess_config.image_size, "image")
        vector = await server.batcher.embed("image", [image])
    hits = (await server.batcher.call(index.search, vector.numpy(), body.k))[0]
    data = [{"rank": r, "id": h.id, "score": h.score, "name": FilePath(h.path).name, "caption": h.caption,
             "url": f"/v1/images/{h.id}"} for r, h in enumerate(hits, 1)]  # fmt: skip
    return {"object": "list", "model": server.name, "data": data}


@router.get("/v1/images/{image_id}", summary="an indexed image, by its id (from /v1/search)",
            responses={200: {"content": {"image/*": {}}}})  # fmt: skip
async def image(image_id: Annotated[int, Path(ge=0, le=2**63 - 1)], server: ServerDep):
    if server.index is None:
        raise ServeError(404, "this server has no index: start it with --index INDEX", "not_found_error")
    path = await server.batcher.call(server.index.path_of, image_id)  # the worker owns the index's SQLite connection
    if path is None:
        raise ServeError(404, f"no indexed image has id {image_id}", "not_found_error")
    path = FilePath(path)
    if not path.is_file():
        raise ServeError(404, f"indexed image {image_id} is no longer on disk", "not_found_error")
    return FileResponse(path, media_type=mimetypes.guess_type(path.name)[0] or "application/octet-stream")

