"""Generate docs/configuration.md from the key tables (``--write``), or check it (``--check``).

Both tables are rendered: the engine's (:class:`kvplane.config.EngineConfig`) and the
controller's (:class:`kvplane.controller.settings.ControllerConfig`). ``--check`` also checks
that docs/controller.md names every controller flag.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path

from kvplane.config import key_specs
from kvplane.controller.settings import controller_keys
from kvplane.settings_table import KeySpec

__all__ = ["missing_controller_flags", "render_configuration_md"]

DOCS = Path(__file__).resolve().parent.parent / "docs"
DOC_PATH = DOCS / "configuration.md"
CONTROLLER_DOC_PATH = DOCS / "controller.md"


def _help(s: KeySpec) -> str:
    extra = []
    if s.choices:
        extra.append("one of " + ", ".join(f"`{c}`" for c in s.choices))
    if s.aliases:
        extra.append("alias " + ", ".join(f"`{a}`" for a in s.aliases))
    if s.secret:
        extra.append("masked in `GET /conf`")
    return s.help + (f" ({'; '.join(extra)})" if extra else "")


def _kind(s: KeySpec) -> str:
    return s.kind.name.replace("|", "\\|")


def _engine_rows(specs: Iterable[KeySpec]) -> list[str]:
    return [
        f"| `{s.name}` | {_kind(s)} | `{s.default!r}` | {'yes' if s.mutable else 'no'} | {_help(s)} |"
        for s in specs
    ]


def _controller_rows(specs: Iterable[KeySpec]) -> list[str]:
    rows = []
    for s in specs:
        flags = ", ".join(f"`{f}`" for f in s.flags) or "`--monitor-ports`"
        rows.append(f"| `{s.name}` | {flags} | {_kind(s)} | `{s.default!r}` | {_help(s)} |")
    return rows


def render_configuration_md() -> str:
    lines = [
        "# Configuration",
        "",
        "Generated from the key tables (`kvplane/config.py`, `kvplane/controller/settings.py`)",
        "by `python -m kvplane.docs --write`; do not edit.",
        "",
        "## Engine",
        "",
        "Keys load from the YAML file named by `KVPLANE_CONFIG_FILE` (alias `LMCACHE_CONFIG_FILE`),",
        "then from the environment as `KVPLANE_<KEY>` or `LMCACHE_<KEY>`, then from explicit",
        "overrides. An unknown key, a wrong type or an out-of-range value stops the load with an",
        "error naming the key. Keys marked mutable can be changed at runtime with `POST /conf`.",
        "",
        "| key | type | default | mutable | description |",
        "|---|---|---|---|---|",
        *_engine_rows(key_specs()),
        "",
        "## Controller",
        "",
        "`kvplane controller` takes these keys from the YAML file named by `--config`, then from",
        "its flags (a flag wins). `monitor_ports` in the file, like `--monitor-ports`, is a mapping",
        '`{"pull": ..., "reply": ..., "heartbeat": ...}` that sets the three `*_port` keys; the',
        "deprecated `--monitor-port N` means pull port N and no reply port. A bad value is an",
        "error naming the flag or key (exit code 2). `GET /conf` on the controller shows them all.",
        "",
        "| key | flags | type | default | description |",
        "|---|---|---|---|---|",
        *_controller_rows(controller_keys()),
    ]
    return "\n".join(lines) + "\n"


def missing_controller_flags() -> list[str]:
    """Controller flags that docs/controller.md does not name."""
    text = CONTROLLER_DOC_PATH.read_text() if CONTROLLER_DOC_PATH.exists() else ""
    flags = [f for s in controller_keys() for f in s.flags]
    return [f for f in [*flags, "--monitor-ports", "--monitor-port", "--config"] if f not in text]


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
    status = 0
    if not DOC_PATH.exists() or DOC_PATH.read_text() != text:
        print(
            "docs/configuration.md is stale: run `python -m kvplane.docs --write`", file=sys.stderr
        )
        status = 1
    missing = missing_controller_flags()
    if missing:
        print(f"docs/controller.md does not name the flags {missing}", file=sys.stderr)
        status = 1
    return status


if __name__ == "__main__":
    raise SystemExit(main())
