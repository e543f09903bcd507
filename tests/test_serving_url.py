"""``serving_url``: what kvplane serve and vLLM fill in from their command lines."""

from __future__ import annotations

import pytest

from kvplane.config import serving_url_of
from kvplane.integrations.vllm.settings import serving_url_from_argv


@pytest.mark.parametrize(
    ("host", "port", "url"),
    [
        ("127.0.0.1", 8000, "http://127.0.0.1:8000"),
        ("0.0.0.0", 81, "http://reach:81"),
        (None, 82, "http://reach:82"),
        ("::", 83, "http://reach:83"),
        ("::1", 84, "http://[::1]:84"),
        ("gpu-7", 85, "http://gpu-7:85"),
    ],
)
def test_serving_url_of_a_bound_address(host: str | None, port: int, url: str) -> None:
    assert serving_url_of(host, port, "reach") == url


@pytest.mark.parametrize(
    ("argv", "url"),
    [
        (["vllm", "serve", "m", "--host", "127.0.0.1", "--port", "8123"], "http://127.0.0.1:8123"),
        (["vllm", "serve", "m", "--port=9001"], "http://10.0.0.5:9001"),
        (["vllm", "serve", "m"], "http://10.0.0.5:8000"),
        (["vllm", "serve", "m", "--port", "x"], None),
        (["python", "-c", "..."], None),
        (["vllm"], None),
    ],
)
def test_serving_url_from_vllms_command_line(argv: list[str], url: str | None) -> None:
    assert serving_url_from_argv(argv, "10.0.0.5") == url
