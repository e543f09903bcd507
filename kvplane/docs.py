"""Generate docs/configuration.md from the config table (``--write``), or check it (``--check``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvplane.config import key_specs

__all__ = ["render_configuration_md"]

DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"


def render_configuration_md() -> str:
    lines = [
        "# Configuration",
        "",
        "Generated from `kvplane/config.py` by `python -m kvplane.docs --write`; do not edit.",
        "",
        "Keys load from the YAML file named by `KVPLANE_CONFIG_FILE` (alias `LMCACHE_CONFIG_FILE`),",
        "then from the environment as `KVPLANE_<KEY>` or `LMCACHE_<KEY>`, then from explicit",
        "overrides. An unknown key, a wrong type or an out-of-range value stops the load with an",
        "error naming the key. Keys marked mutable can be changed at runtime with `POST /conf`.",
        "",
        "| key | type | default | mutable | description |",
        "|---|---|---|---|---|",
    ]
    for s in key_specs():
        extra = []
        if s.choices:
            extra.append("one of " + ", ".join(f"`{c}`" for c in s.choices))
        if s.aliases:
            extra.append("alias " + ", ".join(f"`{a}`" for a in s.aliases))
        if s.secret:
            extra.append("masked in `GET /conf`")
        help_text = s.help + (f" ({'; '.join(extra)})" if extra else "")
        kind = s.kind.name.replace("|", "\\|")
        lines.append(
            f"| `{s.name}` | {kind} | `{s.default!r}` | {'yes' if s.mutable else 'no'} | {help_text} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--write", action="store_true")
    group.add_argument("--check", action="store_true")
    args = parser.parse_args()
    text = render_configuration_md()
    if args.write:
        DOC_PATH.parent.mkdir(exist_ok=True)
        DOC_PATH.write_text(text)
        return 0
    if not DOC_PATH.exists() or DOC_PATH.read_text() != text:
        print(
            "docs/configuration.md is stale: run `python -m kvplane.docs --write`", file=sys.stderr
        )
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
