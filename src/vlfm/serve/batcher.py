"""The micro-batcher: one worker thread runs every model call, so the model never runs two forward passes at
once on the CPU threads, and concurrent encoder calls that arrive within `max_wait` seconds share one pass.

Requests submit items (a text or an image to embed) or calls (anything else that touches a model or the index:
label embeddings, generation, an index lookup) and await their futures. The worker takes the first item, waits
up to `max_wait` for more (at most `max_batch`), then embeds the texts in one forward pass and the images in
another; calls run alone, in arrival order. With max_batch=1 every item is its own pass (batching off).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from vlfm.io import UsageError

_STOP = object()


@dataclass
class _Item:
    kind: str  # "text" | "image" | "call"
    payload: Any
    future: Future = field(default_factory=Future)


class Batcher:
    def __init__(self, model, max_batch: int = 32, max_wait: float = 0.005,
                 observe: Callable[[str, int], None] | None = None):  # fmt: skip
        if max_batch < 1 or max_wait < 0:
            raise UsageError(f"max_batch must be >= 1 and max_wait >= 0, got {max_batch} and {max_wait}")
        self.model, self.max_batch, self.max_wait = model, max_batch, max_wait
        self.observe = observe or (lambda kind, size: None)  # the metrics' batch-size histogram
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None

    # --- life -------------------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="vlfm-batcher", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(_STOP)
            self._thread.join()
            self._thread = None

    # --- submitting ---------------------------------------------------------------------------------------
    async def embed(self, kind: str, payloads: list) -> torch.Tensor:
        """Normalised embeddings (N, dim) of texts (kind 'text') or PIL images ('image'), in order."""
        items = [_Item(kind, p) for p in payloads]
        for item in items:
            self._queue.put(item)
        rows = await asyncio.gather(*(asyncio.wrap_future(item.future) for item in items))
        return torch.stack(rows)

    async def call(self, fn: Callable, *args, **kwargs):
        """fn(*args, **kwargs) on the worker thread, alone; its result (or its exception)."""
        return await asyncio.wrap_future(self._submit_call(fn, args, kwargs))

    def call_sync(self, fn: Callable, *args, **kwargs):
        """call() from outside the event loop (the app's creation): waits for the result."""
        return self._submit_call(fn, args, kwargs).result()

    def _submit_call(self, fn, args, kwargs) -> Future:
        item = _Item("call", (fn, args, kwargs))
        self._queue.put(item)
        return item.future

    # --- the worker ---------------------------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            batch = [first] if first.kind == "call" else self._gather(first)
            if batch[-1] is _STOP:
                self._process(batch[:-1])
                return
            self._process(batch)

    def _gather(self, first: _Item) -> list:
        """`first` and whatever else arrives within max_wait, up to max_batch encoder items (calls join too,
        to run after the pass; a stop ends the gathering)."""
        batch, encoder = [first], 1
        deadline = time.monotonic() + self.max_wait
        while encoder < self.max_batch:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            batch.append(item)
            if item is _STOP:
                break
            encoder += item.kind != "call"
        return batch

    def _process(self, batch: list[_Item]) -> None:
        for kind, embed in (("text", self.model.embed_texts), ("image", self.model.embed_images)):
            group = [item for item in batch if item.kind == kind]
            if group:
                self.observe(kind, len(group))
                _settle(group, partial(embed, [item.payload for item in group]))
        for item in batch:
            if item.kind == "call":
                fn, args, kwargs = item.payload
                _settle([item], partial(_one, fn, args, kwargs))


def _one(fn, args, kwargs) -> list:
    return [fn(*args, **kwargs)]


def _settle(items: list[_Item], compute: Callable[[], Any]) -> None:
    """Each item's future gets its row of compute()'s result, or compute()'s exception; a future whose request
    was cancelled (the client went away) gets nothing."""
    live = [item.future.set_running_or_notify_cancel() for item in items]
    try:
        rows = compute()
    except Exception as error:  # the request that sent it reports it; the worker goes on serving
        rows = [error] * len(items)
    for item, row, alive in zip(items, rows, live):
        if alive and isinstance(row, Exception):
            item.future.set_exception(row)
        elif alive:
            item.future.set_result(row)
