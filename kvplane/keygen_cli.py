"""``kvplane keygen``: write a CURVE key pair for the controller-worker sockets."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_parser"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "keygen",
        help="write a CURVE key pair (NAME.key, NAME.key_secret) for the worker ports",
        description="Write DIR/NAME.key (the public key: copy it to the other side) and "
        "DIR/NAME.key_secret (both keys, mode 0600: keep it where it is). The controller "
        "needs its .key_secret (curve_secret_key_file) and a directory of the workers' .key "
        "files (curve_allowed_keys_dir); each worker its own .key_secret "
        "(controller_curve_secret_key_file) and the controller's .key "
        "(controller_curve_public_key_file). An existing key is never overwritten.",
    )
    p.add_argument("directory", help="where the two files go (made if missing)")
    p.add_argument("--name", default="kvplane", help="the files' base name (default kvplane)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from kvplane.curve import write_key_pair

    public, secret = write_key_pair(args.directory, args.name)
    print(f"public key: {public}\nsecret key: {secret}")
    return 0
