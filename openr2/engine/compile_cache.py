"""The directory of compiled steps (engine/aoti.py's packages) kept within bounds: `prune`.

Packages pile up: every change of openr2's model code, torch version, model or shape class builds new ones,
and the old stay. An engine that compiles prunes when it starts and again after its warm-up
(engine/runner.py): packages of another torch version (this install can never use them), leftovers of builds
that did not finish, and then the least recently used packages until the directory fits its cap, by default
1 GiB ($OPENR2_COMPILED_CACHE_MB). A package's last use is its manifest's time, which `touch` sets for the
packages an engine runs with; those are never removed while it runs. Another process that finds a package
gone between reading its manifest and loading it builds it again (aoti.find warns).
"""

from __future__ import annotations

import json
import os
import shutil
import time

import torch

DEFAULT_MAX_MB = 1024  # the cache directory's cap unless $OPENR2_COMPILED_CACHE_MB says otherwise


def touch(paths) -> None:
    """Mark packages (.pt2 paths) as used now: their manifests' time is what pruning orders by."""
    for path in paths:
        try:
            os.utime(path[: -len(".pt2")] + ".json")
        except FileNotFoundError:
            pass


def max_bytes() -> int:
    """The cache directory's cap: $OPENR2_COMPILED_CACHE_MB (MiB), else DEFAULT_MAX_MB."""
    value = os.environ.get("OPENR2_COMPILED_CACHE_MB")
    if value is None:
        return DEFAULT_MAX_MB << 20
    try:
        mb = float(value)
    except ValueError:
        raise ValueError(f"OPENR2_COMPILED_CACHE_MB: expected a number of MiB, got {value!r}") from None
    if mb < 0:
        raise ValueError(f"OPENR2_COMPILED_CACHE_MB: must be >= 0, got {value!r}")
    return int(mb * (1 << 20))


def prune(cache_dir: str, limit: int | None = None, keep=(), stale_after_s: float = 3600.0) -> list[str]:
    """Remove from cache_dir (the paths removed are returned):
    - packages whose manifest names another torch version, or that cannot be read;
    - what builds that did not finish left (a temporary directory, or a package without its manifest) once
      older than stale_after_s (a build under way in another process is younger);
    - then the least recently used packages (by their manifest's time: `touch` sets it when a process uses one) until the rest take
      at most `limit` bytes (default max_bytes()).
    Never a package in `keep` (the caller's packages in use)."""
    limit = max_bytes() if limit is None else limit
    keep = set(keep)
    now = time.time()
    removed, packages = [], []  # packages: (last use, bytes, package path)
    try:
        entries = list(os.scandir(cache_dir))
    except FileNotFoundError:
        return removed
    manifests = {e.path[: -len(".json")] + ".pt2" for e in entries if e.name.endswith(".json")}
    for entry in entries:
        try:
            age = now - entry.stat().st_mtime
            if entry.is_dir(follow_symlinks=False):
                if entry.name.startswith("tmp") and age > stale_after_s:
                    shutil.rmtree(entry.path, ignore_errors=True)
                    removed.append(entry.path)
            elif entry.name.endswith(".pt2") and entry.path not in manifests:
                if age > stale_after_s and entry.path not in keep:
                    os.remove(entry.path)
                    removed.append(entry.path)
            elif entry.name.endswith(".json"):
                path = entry.path[: -len(".json")] + ".pt2"
                size = entry.stat().st_size + (os.path.getsize(path) if os.path.exists(path) else 0)
                if path not in keep and _torch_version(entry.path) != torch.__version__:
                    _remove_package(path)
                    removed.append(path)
                else:
                    packages.append((entry.stat().st_mtime, size, path))
        except FileNotFoundError:  # another process removed it meanwhile
            continue
    total = sum(size for _, size, _ in packages)
    for _, size, path in sorted(packages):  # least recently used first
        if total <= limit:
            break
        if path not in keep:
            _remove_package(path)
            removed.append(path)
            total -= size
    return removed


def _torch_version(manifest_path: str) -> str | None:
    """The torch version a manifest's package was built with; None if the manifest cannot be read."""
    try:
        with open(manifest_path) as f:
            return json.load(f)["key"]["torch"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _remove_package(path: str) -> None:
    """The manifest first: without it nothing reads the package."""
    for name in (path[: -len(".pt2")] + ".json", path):
        try:
            os.remove(name)
        except FileNotFoundError:
            pass
