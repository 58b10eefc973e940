"""Install, into the running interpreter's environment, the packages the project needs that are
missing. Used by the Makefile on a fresh machine.

- torch: pinned to the CPU wheel 2.13.0 when absent (an unpinned torch pulls GBs of CUDA packages).
  A torch already there (the GPU image's 2.11, say) is kept.
- Everything else only when it cannot be imported, so a machine without a package registry but
  with the packages preinstalled (the GPU image) never calls pip for them.

``--overlay DIR REQ...`` instead installs REQ (e.g. ``transformers==5.17.0``) into DIR with
``pip --target``, without dependencies, and then only the dependencies the environment plus DIR
still lack (for transformers 5.17: huggingface-hub<2 and httpx). Run with ``PYTHONPATH=DIR``,
DIR's packages shadow the environment's. DIR is reused when it already holds REQ and nothing is
missing. ``make test-transformers-lowest`` uses it for the lowest supported transformers.
"""

from __future__ import annotations

import importlib
import importlib.metadata as md
import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

# import name -> pip requirement
REQUIRED = {
    "torch": "torch==2.13.0",
    "triton": "triton>=3.8",  # 3.8+ for the CPU interpreter; a GPU image's 3.6 is kept
    "transformers": "transformers>=5.17",  # newest release; the shims warn outside the tested range
    "pytest": "pytest>=8",
    "pytest_benchmark": "pytest-benchmark>=5",
    "numpy": "numpy",
    "matplotlib": "matplotlib>=3.8",
    "PIL": "pillow>=10",
}
#: requirements of an overlay's packages that are never installed into it (torch comes from the
#: environment: an overlay must not pull a CUDA torch)
_NEVER = {"torch"}


def main() -> int:
    if sys.argv[1:2] == ["--overlay"]:
        return overlay(Path(sys.argv[2]), sys.argv[3:])
    missing = [req for name, req in REQUIRED.items() if importlib.util.find_spec(name) is None]
    if "torch==2.13.0" in missing:  # first and alone, so no other package pulls a CUDA torch
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "torch==2.13.0"])
        missing.remove("torch==2.13.0")
    if missing:
        print("installing:", " ".join(missing), flush=True)
        subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", *missing])
    return 0


def _pip_target(target: Path, reqs: list[str]) -> None:
    print(f"overlay {target}: pip install --no-deps --target {target}", *reqs, flush=True)
    subprocess.check_call(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--upgrade"]
        + ["--target", str(target), *reqs]
    )


def _unmet(target: Path) -> list[str]:
    """Requirements of the packages in ``target`` that ``target`` + this environment (``target``
    first, as under PYTHONPATH) do not satisfy."""
    from packaging.requirements import Requirement

    importlib.invalidate_caches()
    unmet = []
    for dist in md.distributions(path=[str(target)]):
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            if req.name.lower() in _NEVER:
                continue
            try:
                found = md.distribution(req.name).version  # sys.path order: target first
            except md.PackageNotFoundError:
                found = None
            if found is None or not req.specifier.contains(found, prereleases=True):
                unmet.append(f"{req.name}{req.specifier}")
    return sorted(set(unmet))


def overlay(target: Path, reqs: list[str]) -> int:
    """Install ``reqs`` and whatever they still need into ``target`` (see the module doc)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    sys.path.insert(0, str(target))
    importlib.invalidate_caches()

    def has_reqs() -> bool:
        for text in reqs:
            req = Requirement(text)
            name = canonicalize_name(req.name)
            dist = next(
                (
                    d
                    for d in md.distributions(path=[str(target)])
                    if canonicalize_name(d.name) == name
                ),
                None,
            )
            if dist is None or not req.specifier.contains(dist.version, prereleases=True):
                return False
        return True

    if target.exists() and has_reqs() and not _unmet(target):
        print(f"overlay {target}: reusing ({' '.join(reqs)} and its dependencies present)")
        return 0
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    _pip_target(target, reqs)
    for _ in range(5):  # each round adds what the last one's packages need
        unmet = _unmet(target)
        if not unmet:
            print(f"overlay {target}: complete")
            return 0
        _pip_target(target, unmet)
    print(f"overlay {target}: still missing {_unmet(target)}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
