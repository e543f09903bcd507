"""``kvplane serve`` start-up errors: a bad flag is a usage error naming it, not a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kvplane.errors import ConfigError
from kvplane.serve.launch import ServeOptions, load_model, resolve_device
from tests.support import free_port, run_kvplane

BAD_FLAGS = [
    (["--device", "foo"], "--device", "'foo'"),
    (["--device", "cuda:99"], "--device", "'cuda:99'"),
    (["--dtype", "foo"], "--dtype", "'foo'"),
    (["--model", "/nonexistent"], "--model", "'/nonexistent'"),
]


@pytest.mark.parametrize(
    ("args", "flag", "value"), BAD_FLAGS, ids=[" ".join(a[0]) for a in BAD_FLAGS]
)
def test_bad_serve_flag_exits_2_naming_flag_and_value(
    args: list[str], flag: str, value: str
) -> None:
    """These exited 1 with a torch / transformers traceback before."""
    # A server that starts anyway is killed at the timeout, and the test fails.
    out = run_kvplane(["serve", "--port", str(free_port()), *args], timeout=60)
    assert out.returncode == 2, out.stdout
    error = out.stdout.strip().splitlines()[-1]
    assert error.startswith(f"kvplane serve: error: {flag}:") and value in error, out.stdout
    assert "Traceback" not in out.stdout


def test_model_dir_that_is_no_checkpoint_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--model: .* has no config\.json"):
        load_model(ServeOptions(model_dir=tmp_path))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="--model: cannot load"):
        load_model(ServeOptions(model_dir=tmp_path))


def test_resolve_device_accepts_the_documented_values() -> None:
    assert resolve_device("cpu", "auto") == (torch.device("cpu"), torch.float32)
    assert resolve_device("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ConfigError, match="--device: 'mps' is not supported"):
        resolve_device("mps", "auto")
