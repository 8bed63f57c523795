"""Pruning the directory of compiled steps (engine/compile_cache.py: prune): packages of another torch version and the
leftovers of unfinished builds go, then the least recently used packages until the rest fit the cap; packages
in use never go. The files are stand-ins with real manifests (pruning reads only names, sizes, times and the
manifest's torch version); building real packages is test_compiled.py's (slow) business."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from openr2.engine import compile_cache


def _package(folder, name: str, size: int, used_s_ago: float, torch_version: str = torch.__version__) -> str:
    """A package of `size` bytes whose manifest was last touched used_s_ago seconds ago; returns its path."""
    path = folder / f"{name}.pt2"
    path.write_bytes(b"\0" * size)
    manifest = folder / f"{name}.json"
    manifest.write_text(json.dumps({"key": {"torch": torch_version}, "rows": [1, 1], "sha256": "0" * 64}))
    when = time.time() - used_s_ago
    os.utime(manifest, (when, when))
    os.utime(path, (when, when))
    return str(path)


def _left(folder) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_prune_drops_other_torch_versions_then_least_recently_used(tmp_path):
    old = _package(tmp_path, "decode_step-aaa-rows1", 3000, used_s_ago=500)
    mid = _package(tmp_path, "decode_step-bbb-rows1", 3000, used_s_ago=300)
    new = _package(tmp_path, "decode_step-ccc-rows2", 3000, used_s_ago=10)
    other = _package(tmp_path, "draft_step-ddd-rows1", 100, used_s_ago=1, torch_version="1.0")
    # everything of ours fits 10,000 bytes: only the other torch's package goes, manifest and all
    assert compile_cache.prune(str(tmp_path), limit=10_000) == [other]
    assert "draft_step-ddd-rows1.pt2" not in _left(tmp_path) and "draft_step-ddd-rows1.json" not in _left(tmp_path)
    # a cap of 7,000 bytes: the least recently used package goes (its manifest's time), the others stay
    assert compile_cache.prune(str(tmp_path), limit=7_000) == [old]
    # a cap that fits nothing: everything goes, except a package in use
    assert compile_cache.prune(str(tmp_path), limit=0, keep=[new]) == [mid]
    assert _left(tmp_path) == {"decode_step-ccc-rows2.pt2", "decode_step-ccc-rows2.json"}


def test_prune_clears_unfinished_builds_only_once_they_are_stale(tmp_path):
    build = tmp_path / "tmpabc123"  # aoti.build's temporary directory
    build.mkdir()
    (build / "step.pt2").write_bytes(b"\0" * 10)
    orphan = tmp_path / "decode_step-eee-rows1.pt2"  # a package whose manifest never came (or was refused)
    orphan.write_bytes(b"\0" * 10)
    assert compile_cache.prune(str(tmp_path), limit=1 << 20) == []  # young: perhaps another process is building it
    hour_ago = time.time() - 3700
    for p in (build, orphan):
        os.utime(p, (hour_ago, hour_ago))
    assert sorted(compile_cache.prune(str(tmp_path), limit=1 << 20)) == sorted([str(build), str(orphan)])
    assert not any(tmp_path.iterdir())


def test_an_unreadable_manifest_is_pruned_and_a_missing_folder_is_no_error(tmp_path):
    (tmp_path / "decode_step-fff-rows1.json").write_text("{not json")
    (tmp_path / "decode_step-fff-rows1.pt2").write_bytes(b"\0")
    assert compile_cache.prune(str(tmp_path), limit=1 << 20) == [str(tmp_path / "decode_step-fff-rows1.pt2")]
    assert compile_cache.prune(str(tmp_path / "missing")) == []


def test_cap_from_the_environment(monkeypatch):
    monkeypatch.delenv("OPENR2_COMPILED_CACHE_MB", raising=False)
    assert compile_cache.max_bytes() == compile_cache.DEFAULT_MAX_MB << 20
    monkeypatch.setenv("OPENR2_COMPILED_CACHE_MB", "1.5")
    assert compile_cache.max_bytes() == 3 << 19
    for bad in ("lots", "-1"):
        monkeypatch.setenv("OPENR2_COMPILED_CACHE_MB", bad)
        with pytest.raises(ValueError, match="OPENR2_COMPILED_CACHE_MB"):
            compile_cache.max_bytes()


def test_a_compiling_engine_prunes_when_it_starts(tmp_path, monkeypatch):
    """An engine that compiles prunes its directory before building anything (no build needed to see it)."""
    import dataclasses

    from openr2.engine.engine import EngineConfig, LLMEngine
    from openr2.model.transformer import build_model
    from openr2.presets import tiny_v3

    stale = _package(tmp_path, "decode_step-aaa-rows1", 10, used_s_ago=0, torch_version="1.0")
    kept = _package(tmp_path, "decode_step-bbb-rows1", 10, used_s_ago=0)
    model = build_model(dataclasses.replace(tiny_v3(), num_nextn_predict_layers=0), seed=0).eval()
    LLMEngine(model, config=EngineConfig(num_blocks=8, compile=True, compile_cache_dir=str(tmp_path)))
    assert not os.path.exists(stale) and os.path.exists(kept)
