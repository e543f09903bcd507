"""A local Llama checkpoint for vLLM tests: seeded random weights and a locally trained
byte-level BPE tokenizer, written by ``save_pretrained``; nothing is downloaded.

The weights come from :func:`kvplane.serve.model.build_model` (transformers'
``LlamaForCausalLM`` with a seeded init), saved as bfloat16 safetensors. The tokenizer is a
``tokenizers`` byte-level BPE trained on a fixed list of this Python's standard-library
sources (deterministic for one Python version), wrapped in ``PreTrainedTokenizerFast``; ids
0, 1, 2 are ``<pad>``, ``<s>``, ``</s>`` and encoding with special tokens prepends ``<s>``.

``init_scale`` multiplies the init's standard deviation (``initializer_range``, 0.02 by
default). With the default the outputs hardly depend on the context; a larger scale (e.g. 8)
makes wrong KV visibly change the logprobs.

Command line: ``python -m kvplane.integrations.vllm.testmodel DIR [--init-scale X] ...``
builds into ``DIR`` unless it already holds the same model.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import shutil
import sysconfig
import tempfile
from pathlib import Path
from typing import Any, cast

__all__ = ["build_model_dir", "ensure_model_dir", "train_tokenizer"]

#: Marks a finished build and records its parameters; written last.
STAMP = "kvplane-testmodel.json"
#: Bump when the build changes in a way the parameters do not show.
BUILD_VERSION = 1
DEFAULT_INIT_RANGE = 0.02
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
#: Standard-library sources the tokenizer is trained on, in this order.
CORPUS_FILES = (
    "argparse.py",
    "collections/__init__.py",
    "dataclasses.py",
    "functools.py",
    "inspect.py",
    "json/decoder.py",
    "json/encoder.py",
    "logging/__init__.py",
    "pathlib.py",
    "subprocess.py",
    "typing.py",
    "textwrap.py",
)
#: Bytes of training text: enough for a 2000-token vocabulary, trained in about a second.
CORPUS_BYTES = 1_500_000


def _corpus() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts: list[str] = []
    total = 0
    for name in CORPUS_FILES:
        path = stdlib / name
        if not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text[: CORPUS_BYTES - total])
        total += len(texts[-1])
        if total >= CORPUS_BYTES:
            break
    if total < 100_000:
        raise RuntimeError(f"too little training text found under {stdlib} ({total} chars)")
    return texts


def train_tokenizer(vocab_size: int = 2000) -> Any:
    """A byte-level BPE of ``vocab_size`` tokens (specials included) as a
    ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD
    )


def _params(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The full parameter set of a build (defaults filled in), as recorded in the stamp."""
    bound = inspect.signature(build_model_dir).bind(".", **kwargs)
    bound.apply_defaults()
    params = {k: v for k, v in bound.arguments.items() if k != "path"}
    return {"build_version": BUILD_VERSION, **params}


def build_model_dir(
    path: str | os.PathLike[str],
    *,
    num_layers: int = 4,
    hidden_size: int = 256,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    vocab_size: int = 2000,
    max_position_embeddings: int = 2048,
    init_scale: float | None = None,
    seed: int = 0,
) -> Path:
    """Write the checkpoint (config, bf16 safetensors, tokenizer) into ``path`` and return it.
    Existing files of the same names are overwritten."""
    import torch
    from transformers import LlamaConfig

    from kvplane.serve.model import build_model

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    if hidden_size % num_heads or num_heads % num_kv_heads:
        raise ValueError("hidden_size must divide by num_heads, num_heads by num_kv_heads")
    tokenizer = train_tokenizer(vocab_size)
    if len(tokenizer) > vocab_size:
        raise RuntimeError(f"tokenizer has {len(tokenizer)} tokens for a vocab of {vocab_size}")
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 8 // 3 // 16 * 16,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads,
        max_position_embeddings=max_position_embeddings,
        initializer_range=DEFAULT_INIT_RANGE * (1.0 if init_scale is None else init_scale),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    # Initialized in float32 (the seeded values), stored as bfloat16 (vLLM's CPU dtype).
    model = cast(Any, build_model(config, dtype=torch.float32, seed=seed)).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def ensure_model_dir(path: str | os.PathLike[str], **kwargs: Any) -> Path:
    """:func:`build_model_dir` into ``path`` unless it already holds a finished build with the
    same parameters. Builds in a sibling temporary folder and renames it into place, so a
    concurrent or interrupted build never leaves a half-written model at ``path``."""
    out = Path(path)
    want = _params(kwargs)
    stamp = out / STAMP
    try:
        if json.loads(stamp.read_text()) == want:
            return out
    except (OSError, ValueError):
        pass
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        build_model_dir(tmp, **kwargs)
        (tmp / STAMP).write_text(json.dumps(want, sort_keys=True))
        tmp.chmod(0o755)  # mkdtemp's 0700 would keep other users' servers out
        if out.exists():
            shutil.rmtree(out)
        try:
            tmp.rename(out)
        except OSError:
            # Another builder won the race; its build has the same stamp or it is rebuilt later.
            if not (out / STAMP).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", type=Path)
    p.add_argument("--num-layers", type=int, default=4)
    p.add_argument("--hidden-size", type=int, default=256)
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-kv-heads", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=2000)
    p.add_argument("--max-position-embeddings", type=int, default=2048)
    p.add_argument("--init-scale", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    out = ensure_model_dir(
        a.path,
        num_layers=a.num_layers,
        hidden_size=a.hidden_size,
        num_heads=a.num_heads,
        num_kv_heads=a.num_kv_heads,
        vocab_size=a.vocab_size,
        max_position_embeddings=a.max_position_embeddings,
        init_scale=a.init_scale,
        seed=a.seed,
    )
    print(out)


if __name__ == "__main__":
    main()
