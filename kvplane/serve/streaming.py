"""``"stream": true`` completions: server-sent events as vLLM sends them.

Each event is ``data: <one JSON chunk>\\n\\n`` (a ``text_completion`` object whose choice
carries the new text), the last choice's chunk carries its ``finish_reason``, an optional
usage chunk follows (``stream_options.include_usage``), and ``data: [DONE]\\n\\n`` ends the
stream. Tokens reach the client as the generator samples them: it calls back on its own
thread, the callback hands each token to the event loop, and the response's iterator sends
it at once. A client that goes away cancels the iterator, which tells the generator to stop
after its current token (the request finishes as ``abort``).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from kvplane.errors import KvplaneError
from kvplane.serve.generator import Completion, SamplingParams
from kvplane.serve.launch import ServedModel
from kvplane.serve.tokenizer import Tokenizer

__all__ = ["DONE", "TextDeltas", "sse", "stream_completions"]

DONE = b"data: [DONE]\n\n"


def sse(chunk: dict[str, Any]) -> bytes:
    """One server-sent event carrying ``chunk`` as compact JSON."""
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


class TextDeltas:
    """The text each new token adds. A token that ends inside a multi-byte character
    adds nothing until the character is whole (its decoding ends in U+FFFD until then)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._tokens: list[int] = []
        self._sent = 0

    def add(self, token: int) -> str:
        self._tokens.append(token)
        text = self._tokenizer.decode(self._tokens)
        if text.endswith("\ufffd"):
            return ""
        delta, self._sent = text[self._sent :], len(text)
        return delta

    def rest(self) -> str:
        """What is held back at the end (an incomplete character, decoded as U+FFFD)."""
        text = self._tokenizer.decode(self._tokens)
        delta, self._sent = text[self._sent :], len(text)
        return delta


_FINISHED = object()


async def stream_completions(
    served: ServedModel,
    prompts: list[list[int]],
    params: SamplingParams,
    *,
    include_usage: bool,
) -> AsyncIterator[bytes]:
    """The events of one completions request over ``prompts`` (choice ``i`` for prompt
    ``i``, generated one after another). Checked before the first byte by the caller."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    gone = threading.Event()
    head = {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": served.name,
    }

    def run() -> list[Completion]:
        done = []
        for index, prompt in enumerate(prompts):

            def on_token(token: int, index: int = index) -> bool:
                loop.call_soon_threadsafe(queue.put_nowait, (index, token))
                return not gone.is_set()

            done.append(served.generator.generate(prompt, params, on_token))
            loop.call_soon_threadsafe(queue.put_nowait, (index, done[-1]))
            if gone.is_set():
                break
        return done

    worker = loop.run_in_executor(None, run)
    worker.add_done_callback(lambda _: queue.put_nowait(_FINISHED))
    deltas = [TextDeltas(served.tokenizer) for _ in prompts]
    try:
        while (item := await queue.get()) is not _FINISHED:
            index, what = item
            if isinstance(what, Completion):
                reason = "stop" if what.finish_reason == "stop" else "length"
                last = _choice(index, deltas[index].rest(), reason)
                yield sse({**head, "choices": [last], "usage": None})
            elif text := deltas[index].add(what):
                yield sse({**head, "choices": [_choice(index, text, None)], "usage": None})
        try:
            done = await worker
        except KvplaneError as exc:  # after the first byte: an error event, as vLLM sends
            error = {"message": str(exc), "type": type(exc).__name__, "code": exc.status_code}
            yield sse({"error": error})
            yield DONE
            return
        if include_usage:
            yield sse({**head, "choices": [], "usage": _usage(done)})
        yield DONE
    finally:
        gone.set()


def _choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {
        "index": index,
        "text": text,
        "logprobs": None,
        "finish_reason": finish_reason,
        "stop_reason": None,
    }


def _usage(done: list[Completion]) -> dict[str, Any]:
    prompt = sum(len(c.prompt_tokens) for c in done)
    completion = sum(len(c.output_tokens) for c in done)
    cached = sum(c.cached_tokens for c in done)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }
