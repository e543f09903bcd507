"""A request's prompt token ids, as its backend will compute them, so that the index's
chunk keys (:mod:`kvplane.keys`, hashed from token ids) match the backend's.

The backend's own ``/tokenize`` answers (vLLM's takes a completions ``prompt`` or a chat's
``messages`` with its chat template; kvplane serve's a ``prompt``), so the ids are the
backend's by construction, chat template and special tokens included. Answers are kept per
model (an LRU of :attr:`RouterConfig.tokenize_cache_size` prompts): a repeated prompt, or a
chat's earlier turns, cost no round trip.

With a local tokenizer (:class:`LocalTokenizer`, config key ``tokenizer``) a completions
prompt is tokenized in the router instead: a backend's ``/tokenize`` is a round trip to a
server whose cores are busy with prefills (43-70 ms a decision in the full `make
bench-route` on 2 cores).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import msgspec

from kvplane.errors import ConfigError

__all__ = ["LocalTokenizer", "TokenCache", "tokenize_body"]

#: Fields of a chat request that its chat template sees (vLLM's /tokenize takes them).
_CHAT_FIELDS = (
    "messages",
    "add_generation_prompt",
    "continue_final_message",
    "chat_template",
    "chat_template_kwargs",
    "tools",
)


def tokenize_body(kind: str, body: dict[str, Any]) -> dict[str, Any] | list[int] | None:
    """What to POST to a backend's /tokenize for a request of ``kind`` (``"completions"``
    or ``"chat"``), or the token ids when the request already gives them; None when the
    request has nothing to tokenize (the index is then not asked). A batch of prompts is
    routed by its first."""
    model = body.get("model")
    if kind == "chat":
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return None
        return {"model": model, **{k: body[k] for k in _CHAT_FIELDS if k in body}}
    prompt = body.get("prompt")
    if isinstance(prompt, list) and prompt:
        first = prompt[0]
        if isinstance(first, int) and not isinstance(first, bool):
            return [int(t) for t in prompt] if all(isinstance(t, int) for t in prompt) else None
        if isinstance(first, list):
            return [int(t) for t in first] if all(isinstance(t, int) for t in first) else None
        prompt = first
    if not isinstance(prompt, str):
        return None
    tok: dict[str, Any] = {"model": model, "prompt": prompt}
    if "add_special_tokens" in body:
        tok["add_special_tokens"] = body["add_special_tokens"]
    return tok


#: A /tokenize body as one canonical string of bytes (keys sorted): the cache's key, made
#: for every request (a 1K-token prompt in 2 us, where json.dumps took 12).
_canonical = msgspec.json.Encoder(order="sorted").encode

CacheKey = tuple[str, bytes]


class TokenCache:
    """Token ids by (model, /tokenize body), least recently used dropped first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._entries: OrderedDict[CacheKey, list[int]] = OrderedDict()

    @staticmethod
    def key(model: str, tokenize: dict[str, Any]) -> CacheKey:
        return model, _canonical(tokenize)

    def get(self, key: CacheKey) -> list[int] | None:
        tokens = self._entries.get(key)
        if tokens is not None:
            self._entries.move_to_end(key)
        return tokens

    def put(self, key: CacheKey, tokens: list[int]) -> None:
        if self.size <= 0:
            return
        self._entries[key] = tokens
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)


class LocalTokenizer:
    """A ``tokenizer.json`` (Hugging Face ``tokenizers``) loaded in the router. It must be
    the backends' own; the router compares its first prompt with a backend's /tokenize."""

    def __init__(self, path: str | Path) -> None:
        """Load ``path``: a tokenizer.json or a model folder holding one. Raises
        ConfigError when there is none, it does not load, or ``tokenizers`` is missing."""
        file = Path(path)
        if file.is_dir():
            file = file / "tokenizer.json"
        if not file.is_file():
            raise ConfigError(f"tokenizer {str(path)!r}: no such tokenizer.json")
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise ConfigError(
                "tokenizer: the `tokenizers` package is not installed (the engine extra)"
            ) from None
        try:
            self._tokenizer = Tokenizer.from_file(str(file))
        except Exception as exc:  # the Rust loader raises a bare Exception
            raise ConfigError(f"tokenizer {str(file)!r} does not load: {exc}") from None
        self.path = file

    def encode(self, tokenize: dict[str, Any]) -> list[int] | None:
        """The ids of a completions ``/tokenize`` body (:func:`tokenize_body`); None for
        anything else (a chat needs its template: the backend's /tokenize)."""
        prompt = tokenize.get("prompt")
        if not isinstance(prompt, str) or "messages" in tokenize:
            return None
        special = tokenize.get("add_special_tokens", True)
        return list(self._tokenizer.encode(prompt, add_special_tokens=bool(special)).ids)
