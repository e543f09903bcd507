"""``--model DIR``: a local Llama checkpoint and its own tokenizer, nothing downloaded.

The checkpoint is written here with transformers' ``save_pretrained`` (random weights, a
word-level tokenizer), then served by a real ``kvplane serve --model DIR`` process.
"""

from __future__ import annotations

import httpx
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from kvplane.serve.cli import build_instance
from kvplane.serve.generator import SamplingParams
from kvplane.serve.launch import ServeOptions
from tests.support import free_port, kvplane_env, kvplane_process, wait_until

WORDS = [
    "<pad>",
    "<s>",
    "</s>",
    "<unk>",
    *["the", "kv", "cache", "keeps", "keys", "and", "values", "of", "tokens"],
]
PROMPT = "the kv cache keeps keys and values of the tokens " * 6


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("checkpoint")
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    ).save_pretrained(path)
    config = LlamaConfig(
        vocab_size=len(WORDS),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(path)
    return path


def test_checkpoint_model_takes_its_shape_into_the_engine_and_hits_the_cache(checkpoint, tmp_path):
    cfg = tmp_path / "kvplane.yaml"
    cfg.write_text("chunk_size: 16\nmax_local_cpu_size: 0.01\n")
    runtime, served = build_instance(
        ServeOptions(model_dir=checkpoint, max_model_len=512), str(cfg)
    )
    try:
        assert served.name == str(checkpoint)
        layout = runtime.layout
        assert (layout.num_layers, layout.num_kv_heads, layout.head_size) == (2, 2, 16)
        prompt = served.tokenizer.encode(PROMPT)
        assert prompt[:3] == [4, 5, 6]  # the checkpoint's own ids
        params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
        cold = served.generator.generate(prompt, params)
        warm = served.generator.generate(prompt, params)
        model = LlamaForCausalLM.from_pretrained(str(checkpoint), local_files_only=True)
        with torch.no_grad():
            want = model.generate(
                torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None
            )[0, len(prompt) :].tolist()
        assert cold.output_tokens == warm.output_tokens == want
        assert (cold.cached_tokens, warm.cached_tokens) == (0, len(prompt) - 1)
        assert torch.allclose(cold.prompt_logits, warm.prompt_logits, atol=1e-4)
    finally:
        runtime.stop()


def test_serve_model_dir_over_http(checkpoint, tmp_path):
    port = free_port()
    args = ["serve", "--model", str(checkpoint), "--port", str(port), "--max-model-len", "512"]
    env = kvplane_env(OMP_NUM_THREADS="1")
    with kvplane_process(args, env=env, log_path=tmp_path / "serve.log") as proc:
        base = f"http://127.0.0.1:{port}"
        wait_until(
            lambda: proc.poll() is None and httpx.get(f"{base}/health").status_code == 200,
            timeout=90,
            what="kvplane serve --model",
        )
        tokens = httpx.post(f"{base}/tokenize", json={"prompt": "the kv cache"}).json()
        assert tokens["tokens"] == [4, 5, 6]
        reply = httpx.post(
            f"{base}/v1/completions",
            json={"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "ignore_eos": True},
            timeout=60,
        ).json()
        assert reply["model"] == str(checkpoint)
        assert reply["usage"]["completion_tokens"] == 4
        assert set(reply["choices"][0]["text"].split()) <= set(WORDS[4:])
