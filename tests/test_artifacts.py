"""The compiled-artifact store (portable/artifacts.py) on its own, with no ONNX involved: build once then reuse,
never a half-written artifact, parallel builds, killed builds' leftovers, unwritable folders."""

from __future__ import annotations

import json

import pytest

from portable.artifacts import ArtifactStore
from portable.errors import PortableError


def _store_get(store, key, calls, rebuild=False, fail=False):
    def compile():
        calls.append("compile")
        return "built"

    def save(built, folder):
        if fail:
            (folder / "half.bin").write_bytes(b"x")
            raise RuntimeError("disk full")
        (folder / "data.txt").write_text(built)
        return {"note": "ok"}

    return store.get("test", key, compile=compile, save=save,
                     load=lambda folder, manifest: (folder / "data.txt").read_text(), rebuild=rebuild)


def test_store_builds_once_then_reuses(tmp_path):
    store, calls = ArtifactStore(tmp_path), []
    first = _store_get(store, {"model": "a", "precision": "fp32"}, calls)
    assert first.reused is False and first.value == "built" and first.manifest["note"] == "ok"
    assert first.compile_s is not None and first.save_s is not None and first.load_s is not None
    again = _store_get(store, {"precision": "fp32", "model": "a"}, calls)  # key order does not matter
    assert again.reused is True and again.compile_s is None and again.path == first.path and calls == ["compile"]
    other = _store_get(store, {"model": "b", "precision": "fp32"}, calls)
    assert other.reused is False and other.path != first.path
    rebuilt = _store_get(store, {"model": "a", "precision": "fp32"}, calls, rebuild=True)
    assert rebuilt.reused is False and rebuilt.path == first.path and calls.count("compile") == 3


def test_store_never_leaves_a_half_written_artifact(tmp_path):
    store, calls = ArtifactStore(tmp_path), []
    with pytest.raises(RuntimeError, match="disk full"):
        _store_get(store, {"model": "a"}, calls, fail=True)
    assert list(tmp_path.iterdir()) == []
    good = _store_get(store, {"model": "a"}, calls)
    with pytest.raises(RuntimeError):
        _store_get(store, {"model": "a"}, calls, rebuild=True, fail=True)
    assert (good.path / "data.txt").read_text() == "built"  # a failed rebuild keeps the old artifact
    assert [p.name for p in tmp_path.iterdir()] == [good.path.name]


def test_a_run_that_builds_second_keeps_the_artifact_a_parallel_run_saved_first(tmp_path):
    """CI jobs on one cold artifact folder build the same artifact at once. The first to finish saves it and loads
    from it; a later finisher must not move that folder away under it (only --rebuild replaces an artifact)."""
    store, key = ArtifactStore(tmp_path), {"model": "a"}
    theirs = []

    def compile():  # while we compile, another run saves the same artifact
        theirs.append(_store_get(ArtifactStore(tmp_path), key, []))
        return "ours"
    ours = store.get("test", key, compile=compile, save=lambda built, folder: (folder / "data.txt").write_text(built)
                     and {}, load=lambda folder, manifest: (folder / "data.txt").read_text())
    assert ours.reused is False and ours.path == theirs[0].path and ours.theirs and not theirs[0].theirs
    assert ours.value == "built" and (ours.path / "data.txt").read_text() == "built"  # theirs, kept in place
    assert [p.name for p in tmp_path.iterdir()] == [ours.path.name]  # our copy removed, no temporary folders left
    assert _store_get(store, key, [], rebuild=True).path == ours.path  # --rebuild still replaces it


def _rebuild(store, key, value):
    return store.get("test", key, compile=lambda: value, save=lambda built, folder: (folder / "data.txt").write_text(
        built) and {}, load=lambda folder, manifest: (folder / "data.txt").read_text(), rebuild=True)


def test_a_rebuild_swaps_the_artifact_in_without_a_moment_missing(tmp_path, monkeypatch):
    """Other runs may look for the artifact while --rebuild replaces it: with an atomic swap (Linux) they always find
    a complete one. After every rename the store makes, the artifact is checked for."""
    from portable import artifacts

    probe = tmp_path / "probe"
    (probe / "a").mkdir(parents=True)
    (probe / "b").mkdir()
    if not artifacts._exchange(probe / "a", probe / "b"):
        pytest.skip("this system or file system cannot swap two folders atomically")
    store, key = ArtifactStore(tmp_path / "store"), {"model": "a"}
    _store_get(store, key, [])
    found = []

    def watched(rename):
        def call(*args):
            result = rename(*args)
            found.append(store.find("test", key) is not None)
            return result
        return call
    monkeypatch.setattr(artifacts.os, "rename", watched(artifacts.os.rename))
    monkeypatch.setattr(artifacts, "_exchange", watched(artifacts._exchange))
    new = _rebuild(store, key, "rebuilt")
    assert new.value == "rebuilt" and found and all(found)
    assert [p.name for p in store.root.iterdir()] == [new.path.name]  # the old folder removed


def test_a_rebuild_where_folders_cannot_be_swapped_renames_the_old_one_away(tmp_path, monkeypatch):
    from portable import artifacts

    monkeypatch.setattr(artifacts, "_exchange", lambda a, b: False)
    store, key = ArtifactStore(tmp_path), {"model": "a"}
    first = _store_get(store, key, [])
    new = _rebuild(store, key, "rebuilt")
    assert new.path == first.path and new.value == "rebuilt" and (new.path / "data.txt").read_text() == "rebuilt"
    assert [p.name for p in tmp_path.iterdir()] == [new.path.name]


def test_saving_removes_the_temporary_folders_of_runs_killed_long_ago(tmp_path):
    """A SIGKILLed build leaves its `.building-*` folder (its cleanup never runs): the next save removes those over a
    day old and keeps younger ones, which may be another run's build in progress."""
    import os
    import time

    from portable import artifacts

    stale, recent = tmp_path / ".building-x-1", tmp_path / ".old-y-2"
    for folder, age in ((stale, artifacts.STALE_S + 60), (recent, 60)):
        folder.mkdir()
        (folder / "part").write_text("half")
        os.utime(folder, (time.time() - age,) * 2)
    saved = _store_get(ArtifactStore(tmp_path), {"model": "a"}, [])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([recent.name, saved.path.name])


def test_store_ignores_a_folder_without_a_complete_manifest(tmp_path):
    store, calls = ArtifactStore(tmp_path), []
    key = {"model": "a"}
    store.folder("test", key).mkdir(parents=True)
    (store.folder("test", key) / "artifact.json").write_text("{not json")
    assert store.find("test", key) is None
    assert _store_get(store, key, calls).reused is False
    manifest = json.loads((store.folder("test", key) / "artifact.json").read_text())
    assert manifest["key"] == key


def test_store_default_root_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("PORTABLE_CACHE_DIR", str(tmp_path))
    assert ArtifactStore().root == tmp_path / "artifacts"


def test_store_refuses_an_unwritable_folder_before_compiling(tmp_path):
    """A read-only home or --artifact-dir: one line before the build, not after minutes of exporting."""
    (tmp_path / "a-file").write_text("")
    calls = []
    with pytest.raises(PortableError, match="cannot write compiled artifacts under .*--artifact-dir"):
        _store_get(ArtifactStore(root=tmp_path / "a-file" / "artifacts"), {"model": "a"}, calls)
    assert calls == []
