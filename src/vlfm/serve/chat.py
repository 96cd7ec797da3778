"""/v1/chat/completions in OpenAI's shape (content parts with one `image_url`), for an assistant checkpoint;
`stream: true` sends the answer as server-sent events while it is generated."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Annotated, Literal

import torch
from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field

from vlfm.io import VlfmError
from vlfm.serve.app import Server, get_server
from vlfm.serve.limits import ServeError, check_text, image_from_string, over_limit

router = APIRouter()


class ImageURL(BaseModel):
    url: str = Field(description="a data URL (data:image/png;base64,...) or base64: the server fetches nothing")


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]]


class ChatRequest(BaseModel):
    messages: list[Message] = Field(description="the conversation, ending with a user message; one image in all")
    model: str | None = Field(None, description="ignored: the server answers with the assistant it was started with")
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate at most (default: the server's limit)")
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens")
    temperature: float = Field(0.0, ge=0, le=2, description="0: greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = Field(0, ge=0, le=2**63 - 1, description="the sampling seed (temperature > 0)")
    stream: bool = False


@router.post("/v1/chat/completions", summary="the assistant's answer about an image (OpenAI's chat shape; SSE with stream)")
async def chat_completions(body: ChatRequest, server: Annotated[Server, Depends(get_server)]):
    vlm = server.vlm
    if vlm is None:
        raise ServeError(404, "this server has no assistant: start it with --vlm VLM", "not_found_error")
    image, history, question = _conversation(body.messages, server)
    prompt = len(vlm.chat_prompt(question, history))
    if prompt >= vlm.config.lm.max_positions:
        raise ServeError(400, f"the prompt is {prompt} tokens (the image included); the assistant's context holds "
                              f"{vlm.config.lm.max_positions}: shorten the messages", "limit_exceeded")  # fmt: skip
    wanted = body.max_completion_tokens or body.max_tokens or server.limits.max_tokens
    over_limit(server.limits, "max_tokens", wanted, f"max_tokens={wanted:,}")
    wanted = min(wanted, vlm.config.lm.max_positions - prompt)  # as model.chat: what the context has left
    generation = {"max_new_tokens": wanted, "temperature": body.temperature, "top_p": body.top_p,
                  "generator": torch.Generator().manual_seed(body.seed)}  # fmt: skip
    reply = {"id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "created": int(time.time()), "model": server.vlm_name}
    if body.stream:
        return StreamingResponse(_stream(server, (image, question, history), generation, reply), media_type="text/event-stream")
    steps: list[int] = []
    answer = await server.batcher.call(vlm.chat, image, question, history, on_step=lambda out: steps.append(len(out[0])), **generation)
    used = steps[-1] if steps else 0
    return {**reply, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": _finish(steps, wanted)}],
            "usage": {"prompt_tokens": prompt, "completion_tokens": used, "total_tokens": prompt + used}}  # fmt: skip


def _finish(steps: list[int], wanted: int) -> str:
    """'stop' when a stop token ended the answer (a step added no token), 'length' when max_tokens did."""
    return "length" if len(steps) >= wanted and steps and steps[-1] == len(steps) else "stop"


def _conversation(messages: list[Message], server: Server):
    """(image, history, question): model.chat's arguments. The one image's placeholder goes into the earlier
    user message that carried it (model.chat puts it before the question when the last message carries it)."""
    vlm, limits = server.vlm, server.limits
    if not messages:
        raise ServeError(400, "messages is empty: send at least one user message")
    over_limit(limits, "max_messages", len(messages), f"messages has {len(messages):,} items")
    if messages[-1].role != "user":
        raise ServeError(400, f"the last message must be the user's (found {messages[-1].role!r})")
    images, turns = [], []
    for i, message in enumerate(messages):
        parts = [message.content] if isinstance(message.content, str) else message.content
        texts = [p if isinstance(p, str) else p.text for p in parts if isinstance(p, str) or p.type == "text"]
        text = check_text(limits, "\n".join(texts), f"messages[{i}] text")
        if vlm.config.image_token in text:
            raise ServeError(400, f"messages[{i}] contains {vlm.config.image_token!r}: send the image as an image_url part")
        found = [p.image_url.url for p in parts if not isinstance(p, str) and p.type == "image_url"]
        if found and message.role != "user":
            raise ServeError(400, f"messages[{i}] ({message.role}) carries an image; only user messages may")
        images += [(i, url) for url in found]
        turns.append((message.role, text))
    if len(images) != 1:
        raise ServeError(400, f"the assistant answers about one image: send exactly one image_url part (found {len(images)})")
    where, url = images[0]
    image = image_from_string(url, limits, vlm.config.vision.image_size, f"messages[{where}] image_url")
    if where < len(turns) - 1:
        turns[where] = (turns[where][0], f"{vlm.config.image_token}\n{turns[where][1]}")
    return image, turns[:-1], turns[-1][1]


async def _stream(server: Server, request, generation: dict, reply: dict):
    """SSE chunks: the new text after each generated token, then finish_reason, then [DONE]. Text is sent when
    the decoded answer so far does not end inside a character (byte-level tokens)."""
    image, question, history = request
    loop, queue, steps = asyncio.get_running_loop(), asyncio.Queue(), []
    tokenizer = server.vlm.tokenizer

    def on_step(out):
        steps.append(len(out[0]))
        loop.call_soon_threadsafe(queue.put_nowait, tokenizer.decode(out[0]))

    job = asyncio.ensure_future(server.batcher.call(server.vlm.chat, image, question, history, on_step=on_step, **generation))
    job.add_done_callback(lambda _: loop.call_soon_threadsafe(queue.put_nowait, None))
    chunk = {**reply, "object": "chat.completion.chunk"}
    sent = ""
    yield _event({**chunk, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
    while (text := await queue.get()) is not None:
        if text.startswith(sent) and len(text) > len(sent) and not text.endswith("\ufffd"):
            yield _event({**chunk, "choices": [{"index": 0, "delta": {"content": text[len(sent):]}, "finish_reason": None}]})
            sent = text
    try:
        answer = job.result()
    except Exception as error:  # after the 200 header an error can only be an event; typed as app.py's handlers type it
        kind = "invalid_request_error" if isinstance(error, VlfmError) else "server_error"
        yield _event({"error": {"message": str(error) if kind != "server_error" else f"internal error ({type(error).__name__})", "type": kind}})
        yield "data: [DONE]\n\n"
        return
    rest = answer[len(sent):] if answer.startswith(sent) else ""
    finish = _finish(steps, generation["max_new_tokens"])
    yield _event({**chunk, "choices": [{"index": 0, "delta": {"content": rest} if rest else {}, "finish_reason": finish}]})
    yield "data: [DONE]\n\n"


def _event(data: dict) -> str:
    return f"data: {json.dumps(data)}\n\n"
