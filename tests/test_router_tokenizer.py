"""``kvplane router --tokenizer``: completions prompts tokenized in the router, checked once
against a backend's /tokenize and dropped when they differ; real processes (two instant
fake backends from ``benchmarks/fake_openai.py`` and the router) on loopback."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from kvplane.children import Child, free_ports, kvplane_args, start_child
from tests.router_support import metric
from tests.support import REPO_ROOT, wait_until

WORDS = ["alpha", "beta", "gamma", "delta", "kappa", "sigma"]


def write_tokenizer(path: Path) -> Path:
    """A word-level tokenizer.json whose post-processor puts BOS (id 1) first."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.save(str(path))
    return path


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


class Setup:
    def __init__(self, tmp: Path, backend_tokenizer: Path | None, router_tokenizer: Path) -> None:
        self.children: list[Child] = []
        self.backends: list[str] = []
        for i, port in enumerate(free_ports(2)):
            args = [sys.executable, "-m", "benchmarks.fake_openai", "backend", "--port", str(port)]
            if backend_tokenizer is not None:
                args += ["--tokenizer", str(backend_tokenizer)]
            child = start_child(f"fake-{i}", args, tmp / f"fake-{i}.log", cwd=REPO_ROOT)
            self.children.append(child)
            self.backends.append(f"http://127.0.0.1:{port}")
            child.wait_healthy(f"{self.backends[-1]}/health", timeout=30)
        port = free_ports(1)[0]
        args = ["router", "--host", "127.0.0.1", "--port", str(port)]
        args += ["--tokenizer", str(router_tokenizer), "--log-level", "WARNING"]
        for url in self.backends:
            args += ["--backend", url]
        self.log = tmp / "router.log"
        self.children.append(start_child("router", kvplane_args(args), self.log, cwd=REPO_ROOT))
        self.url = f"http://127.0.0.1:{port}"
        self.children[-1].wait_healthy(f"{self.url}/health", timeout=60)

    def tokenize_calls(self) -> float:
        return sum(metric(url, "fake:tokenize_total") for url in self.backends)

    def complete(self, prompt: str) -> None:
        body = {"model": "fake", "prompt": prompt, "max_tokens": 1}
        reply = httpx.post(f"{self.url}/v1/completions", json=body, timeout=30)
        assert reply.status_code == 200, reply.text

    def stop(self) -> None:
        for child in reversed(self.children):
            child.stop()


Make = Callable[[Path | None, Path], Setup]


@pytest.fixture
def make(tmp_path: Path) -> Iterator[Make]:
    made: list[Setup] = []

    def build(backend_tokenizer: Path | None, router_tokenizer: Path) -> Setup:
        made.append(Setup(tmp_path, backend_tokenizer, router_tokenizer))
        return made[-1]

    try:
        yield build
    finally:
        for s in made:
            s.stop()


PROMPTS = ["alpha beta gamma", "delta kappa", "sigma sigma alpha beta", "kappa"]


def test_the_same_tokenizer_is_checked_once_then_used_in_the_router(
    make: Make, tokenizer: Path
) -> None:
    s = make(tokenizer, tokenizer.parent)  # a folder holding tokenizer.json works too
    wait_until(lambda: s.tokenize_calls() == 0, what="no /tokenize yet")
    for prompt in PROMPTS:
        s.complete(prompt)
    # one /tokenize: the first prompt's check; the rest were tokenized in the router
    assert s.tokenize_calls() == 1
    # BOS and one id per word, as the backend would count them
    want = sum(len(p.split()) + 1 for p in PROMPTS)
    assert metric(s.url, "kvplane_router_prompt_tokens_total") == want
    assert "disagrees" not in s.log.read_text()


def test_a_tokenizer_that_differs_from_the_backends_is_dropped(make: Make, tokenizer: Path) -> None:
    s = make(None, tokenizer)  # the backends count one id per byte
    for prompt in PROMPTS:
        s.complete(prompt)
    # every prompt went to a backend's /tokenize, and the backend's ids were used
    assert s.tokenize_calls() == len(PROMPTS)
    assert metric(s.url, "kvplane_router_prompt_tokens_total") == sum(len(p) for p in PROMPTS)
    wait_until(lambda: "disagrees with the backend" in s.log.read_text(), what="the warning")


def test_a_missing_tokenizer_is_a_clear_error(tmp_path: Path) -> None:
    args = ["router", "--backend", "http://127.0.0.1:1", "--tokenizer", str(tmp_path / "nope")]
    done = subprocess.run(
        kvplane_args(args), capture_output=True, text=True, timeout=60, cwd=REPO_ROOT
    )
    assert done.returncode != 0
    assert "no such tokenizer.json" in done.stderr
    assert "Traceback" not in done.stderr
