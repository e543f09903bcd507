"""The reference server's HTTP front: OpenAI completions (streamed too), /tokenize,
/v1/models, /health, and /metrics (its queue, as vLLM's /metrics shows its own).

Handlers are plain ``def``: FastAPI runs them on its thread pool, so a long prefill does not
stall /health. The generator serializes requests itself (one at a time).
"""

from __future__ import annotations

import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from kvplane.errors import BadRequest, KvplaneError
from kvplane.serve.generator import Completion, SamplingParams
from kvplane.serve.launch import ServedModel
from kvplane.serve.load_metrics import METRICS_TYPE, render_load
from kvplane.serve.protocol import (
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    TokenizeRequest,
    TokenizeResponse,
    Usage,
)
from kvplane.serve.streaming import stream_completions
from kvplane.serve.tokenizer import Tokenizer
from kvplane.web.errors import openai_error_body, validation_message

__all__ = ["TTFT_HEADER", "create_app"]

#: Time to first token of the request's first prompt, in seconds (a non-standard header:
#: a non-streaming client cannot measure it otherwise).
TTFT_HEADER = "x-kvplane-ttft-s"


def create_app(served: ServedModel) -> FastAPI:
    app = FastAPI(title="kvplane reference server")

    @app.exception_handler(KvplaneError)
    def _domain_error(_: Request, exc: KvplaneError) -> JSONResponse:
        return _error(exc.status_code, str(exc))

    @app.exception_handler(RequestValidationError)
    def _invalid_body(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, validation_message(exc.errors()))

    @app.get("/health")
    def health() -> Response:
        return Response(status_code=200)

    @app.get("/v1/models")
    def models() -> ModelList:
        card = ModelCard(
            id=served.name,
            created=served.created,
            root=served.name,
            max_model_len=served.max_model_len,
        )
        return ModelList(data=[card])

    @app.post("/tokenize")
    def tokenize(body: TokenizeRequest) -> TokenizeResponse:
        tokens = served.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return TokenizeResponse(
            count=len(tokens), max_model_len=served.max_model_len, tokens=tokens
        )

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(render_load(served.generator.load()), media_type=METRICS_TYPE)

    @app.post("/v1/completions")
    def completions(body: CompletionRequest) -> Response:
        params = SamplingParams(body.max_tokens, body.temperature, body.seed, body.ignore_eos)
        prompts = _prompts(served, body.prompt)
        if body.stream:
            for prompt in prompts:
                served.generator.check(prompt, params)  # refused before the first byte
            usage = body.stream_options is not None and body.stream_options.include_usage
            events = stream_completions(served, prompts, params, include_usage=usage)
            return StreamingResponse(events, media_type="text/event-stream")
        done = [served.generator.generate(p, params) for p in prompts]
        reply = _completion_response(served.name, done, served.tokenizer)
        return JSONResponse(reply.model_dump(), headers={TTFT_HEADER: f"{done[0].ttft_s:.6f}"})

    return app


def _prompts(served: ServedModel, prompt: str | list[int] | list[str]) -> list[list[int]]:
    """A text, a list of texts, or one prompt already tokenized."""
    if isinstance(prompt, str):
        return [served.tokenizer.encode(prompt)]
    if not prompt:
        raise BadRequest("prompt is empty")
    if all(isinstance(p, int) for p in prompt):
        return [[int(p) for p in prompt]]
    return [served.tokenizer.encode(str(p)) for p in prompt]


def _completion_response(
    model: str, done: list[Completion], tokenizer: Tokenizer
) -> CompletionResponse:
    choices = [
        CompletionChoice(
            text=tokenizer.decode(c.output_tokens),
            index=i,
            finish_reason="stop" if c.finish_reason == "stop" else "length",
        )
        for i, c in enumerate(done)
    ]
    prompt_tokens = sum(len(c.prompt_tokens) for c in done)
    completion_tokens = sum(len(c.output_tokens) for c in done)
    usage = Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(c.cached_tokens for c in done)),
    )
    return CompletionResponse(
        id=f"cmpl-{uuid.uuid4().hex}",
        created=int(time.time()),
        model=model,
        choices=choices,
        usage=usage,
    )


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content=openai_error_body(status, message))
