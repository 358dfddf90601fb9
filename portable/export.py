"""The export job: build and save a backend's compiled artifact without decoding anything.

For a machine that will only load: `portable export` on one machine fills the artifact folder (`--artifact-dir`,
default ~/.cache/portable/artifacts), which is then copied to the others; their decode runs find it and load it.
The report carries the three times: compile (export + optimisation), save, and load (the saved file is loaded once
here, so a broken artifact fails now rather than on the other machine). An artifact that already exists is reused
(no compile, no save) unless `--rebuild`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import backends
from portable import models
from portable.config import RunConfig
from portable.environment import environment
from portable.errors import PortableError


@dataclass
class ExportReport:
    model: str
    backend: str
    precision: str
    device: str
    artifact: str  # the artifact folder
    files: list[str]
    bytes: int
    reused: bool
    compile_s: float | None  # export + optimisation; None when reused
    save_s: float | None
    load_s: float | None
    details: dict = field(default_factory=dict)
    environment: dict = field(default_factory=dict)


def export(config: RunConfig) -> ExportReport:
    source = models.resolve(config.model)
    backend = backends.require(config.backend, config.precision)
    if not getattr(backend, "artifacts", False):
        with_artifacts = [name for name in backends.names() if getattr(_resolve(name), "artifacts", False)]
        raise PortableError(f"backend {config.backend!r} keeps no compiled artifact to export; backends that do: "
                            f"{', '.join(with_artifacts)}")
    info = backend.load(config, source).info
    folder = info.details.get("artifact")
    files = sorted(_files(folder))
    return ExportReport(
        model=source.spec, backend=info.backend, precision=config.precision, device=info.device, artifact=folder,
        files=[p.name for p in files], bytes=sum(p.stat().st_size for p in files), reused=bool(info.artifact_reused),
        compile_s=info.compile_s, save_s=info.save_s, load_s=info.load_s, details=info.details,
        environment=environment())


def _resolve(name: str):
    try:
        return backends.resolve(name)
    except PortableError:
        return None


def _files(folder: str | None) -> list[Path]:
    return [p for p in Path(folder).iterdir() if p.is_file()] if folder else []
