"""Compiled artifacts on disk: build once, save, load on every later run.

A backend whose ready-to-run form is slow to build (an exported ONNX graph, a compiled CUDA package) keeps it here.
An artifact is a folder named by a digest of its *key* -- a flat dict of everything the built result depends on
(model fingerprint, precision, opset, exporter and runtime versions, ...) -- holding the files the backend writes and
`artifact.json` (the key, what was built, when, and how long each stage took). Change any key field and the next run
builds a new artifact; keep them all and it loads the saved one.

Folders are built under a temporary name next to their final place and renamed into it, so a crash or Ctrl-C never
leaves a half-written artifact where a later run would find it. Runs that build the same artifact at once (CI jobs
sharing a cold folder) each build it; the first to finish saves it and the others keep that one, which a run may
already be loading. `rebuild=True` builds afresh and swaps the new folder for the old one (`_replace`). The
temporary folders of a killed run (SIGKILL skips its cleanup) are removed by a later save once they are a day old.

Where: `RunConfig.artifact_dir`, else `$PORTABLE_CACHE_DIR/artifacts`, else `~/.cache/portable/artifacts`.

Each stage (compile, save, load) is timed on its own and shows a spinner on stderr when stderr is a terminal.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Generic, Iterator, TypeVar

from portable.config import user_cache_dir
from portable.errors import PortableError

MANIFEST = "artifact.json"
FORMAT = "portable-artifact"

Built = TypeVar("Built")
Loaded = TypeVar("Loaded")


def default_root() -> Path:
    return user_cache_dir() / "artifacts"


def digest(key: dict) -> str:
    return hashlib.sha256(_canonical(key).encode()).hexdigest()[:16]


def _canonical(key: dict) -> str:
    return json.dumps(key, sort_keys=True, default=str)


@dataclass
class Artifact(Generic[Loaded]):
    """A loaded artifact and how it got here. `compile_s` and `save_s` are None when it was reused; `theirs`: this
    run built and wrote one, but another run saved the same artifact first, so that copy was kept and loaded."""

    value: Loaded
    path: Path
    manifest: dict
    reused: bool
    compile_s: float | None
    save_s: float | None
    load_s: float
    theirs: bool = False


class Stages:
    """Spinners for long stages on stderr (only on a terminal, and not when quiet); each stage is timed."""

    def __init__(self, enabled: bool | None = None):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str, label: str) -> Iterator[None]:
        start = time.perf_counter()
        if not self.enabled:
            yield
        else:
            from rich.console import Console

            console = Console(stderr=True)
            with console.status(f"{label}..."):
                yield
            console.print(f"[green]done[/] {label} ({time.perf_counter() - start:.2f} s)", highlight=False)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start


class ArtifactStore:
    """Artifacts of one kind ("onnx", ...) under one root folder."""

    def __init__(self, root: Path | None = None, stages: Stages | None = None):
        self.root = Path(root).expanduser() if root is not None else default_root()
        self.stages = stages or Stages(enabled=False)

    def folder(self, kind: str, key: dict) -> Path:
        return self.root / f"{kind}-{digest(key)}"

    def find(self, kind: str, key: dict) -> Path | None:
        """The folder of a complete artifact with exactly this key, if there is one."""
        folder = self.folder(kind, key)
        manifest = read_manifest(folder)
        if manifest is None or _canonical(manifest.get("key", {})) != _canonical(key):
            return None
        return folder

    def get(self, kind: str, key: dict, *, compile: Callable[[], Built], save: Callable[[Built, Path], dict],
            load: Callable[[Path, dict], Loaded], rebuild: bool = False, label: str = "artifact") -> Artifact[Loaded]:
        """Load the artifact with this key, building and saving it first if there is none (or if `rebuild`).

        compile() -> built object (in memory); save(built, folder) writes its files into `folder` and returns
        metadata for the manifest; load(folder, manifest) -> the ready object. Each is timed separately.
        """
        folder = None if rebuild else self.find(kind, key)
        compile_s = save_s = None
        theirs = False
        if folder is None:
            self._make_temp(".probe-").rmdir()  # before compiling: an unwritable root would throw the compile away
            built, compile_s = self._timed("compile", f"Building {label}", compile)
            (folder, theirs), save_s = self._timed("save", f"Saving {label}",
                                                   lambda: self._save(kind, key, built, save, replace=rebuild))
            del built
        manifest = read_manifest(folder) or {}
        value, load_s = self._timed("load", f"Loading {label}", lambda: load(folder, manifest))
        return Artifact(value=value, path=folder, manifest=manifest, reused=compile_s is None, compile_s=compile_s,
                        save_s=save_s, load_s=load_s, theirs=theirs)

    def _timed(self, name: str, label: str, fn: Callable):
        start = time.perf_counter()
        with self.stages.stage(name, label):
            result = fn()
        return result, time.perf_counter() - start

    def _make_temp(self, prefix: str) -> Path:
        """A fresh folder in the root (made if need be), or one line saying that the root cannot be written."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            return Path(tempfile.mkdtemp(prefix=prefix, dir=self.root))
        except OSError as e:
            raise PortableError(f"cannot write compiled artifacts under {self.root} ({e.strerror or e}); choose "
                                f"another folder with --artifact-dir or $PORTABLE_CACHE_DIR") from e

    def _save(self, kind: str, key: dict, built, save: Callable[[object, Path], dict],
              replace: bool = False) -> tuple[Path, bool]:
        """Write the artifact under a temporary name and rename it into place. Unless `replace` (--rebuild), a
        complete artifact that another run finished meanwhile is kept, not moved away under a run loading it.
        Returns the folder and whether it holds that other run's copy."""
        final = self.folder(kind, key)
        tmp = self._make_temp(f".building-{final.name}-")
        _sweep(self.root)
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide a shared cache folder from other users
        try:
            meta = save(built, tmp) or {}
            manifest = {"format": FORMAT, "version": 1, "kind": kind, "key": key,
                        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **meta}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True, default=str) + "\n")
            theirs = not replace and self.find(kind, key) is not None  # a parallel run built it first
            if theirs:
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                _replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return final, theirs


def read_manifest(folder: Path) -> dict | None:
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT else None


STALE_S = 24 * 3600  # a temporary folder untouched this long belongs to a run that was killed (no build takes a day)
TEMPORARY = (".building-", ".old-", ".probe-")


def _sweep(root: Path) -> None:
    """Remove the temporary folders killed runs left behind (SIGKILL skips their cleanup); the age limit spares the
    builds of runs still going, on this machine or another sharing the folder."""
    now = time.time()
    for entry in root.iterdir():
        try:
            if entry.name.startswith(TEMPORARY) and entry.is_dir() and now - entry.stat().st_mtime > STALE_S:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:  # removed meanwhile by another run's sweep
            continue


def _replace(tmp: Path, final: Path) -> None:
    """Move the finished folder `tmp` to `final`, replacing an older one (never leaving `final` half-written). Where
    the system can swap two folders in one step (Linux `renameat2(RENAME_EXCHANGE)`: ext4, xfs, btrfs, tmpfs), `final`
    is never absent; elsewhere the old folder is renamed away first, and for that moment a run looking for it finds
    none (and builds its own)."""
    if final.exists() and _exchange(tmp, final):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old artifact
        return
    old = None
    if final.exists():
        old = final.with_name(f".old-{final.name}-{os.getpid()}-{time.monotonic_ns()}")
        try:
            os.rename(final, old)
        except FileNotFoundError:  # removed meanwhile by another run
            old = None
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)  # another run finished the same artifact first: keep theirs
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: Path, b: Path) -> bool:
    """Swap the folders `a` and `b` atomically; False where this system or file system cannot (or `b` is gone)."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (OSError, AttributeError):
        return False
    at_cwd = -100  # AT_FDCWD: absolute paths, or relative to the working directory
    return renameat2(at_cwd, os.fsencode(a), at_cwd, os.fsencode(b), RENAME_EXCHANGE) == 0
