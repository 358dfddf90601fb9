"""The backend registry: names to lazily imported backend classes.

The CLI's `--backend` choices and the tests' parametrization both read `BACKENDS`; a backend module (and whatever
package it needs, e.g. onnxruntime) is imported only when that backend is resolved.
"""

from __future__ import annotations

import importlib

from backends.base import Availability, Backend, Runner, RunnerInfo
from portable.errors import BackendUnavailable, PortableError

BACKENDS: dict[str, str] = {
    "cpu": "backends.cpu:CpuBackend",
    "cuda": "backends.cuda:CudaBackend",
    "rocm": "backends.rocm:RocmBackend",
    "onnxruntime": "backends.onnxruntime:OrtBackend",
}


def names() -> list[str]:
    return list(BACKENDS)


def resolve(name: str) -> Backend:
    """The backend called `name` (not yet checked for availability)."""
    if name not in BACKENDS:
        raise PortableError(f"unknown backend {name!r}; choose from {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)()
    except ImportError as e:
        raise BackendUnavailable(f"backend {name!r} cannot be used here: {e}") from e


def _usable(name: str) -> bool:
    try:
        return resolve(name).is_available().ok
    except PortableError:
        return False


def require(name: str, precision: str | None = None) -> Backend:
    """The backend called `name`, checked to run here (and to take `precision`), or a one-line error that says
    which backends do."""
    backend = resolve(name)
    status = backend.is_available()
    if not status.ok:
        here = [n for n in BACKENDS if n != name and _usable(n)]
        raise BackendUnavailable(f"backend {name!r} is not available here: {status.reason}; available: "
                                 f"{', '.join(here) or 'none'}")
    if precision is not None and precision not in backend.precisions:
        raise PortableError(f"backend {name!r} does not run precision {precision!r}; it takes "
                            f"{', '.join(backend.precisions)}")
    return backend


__all__ = ["BACKENDS", "Availability", "Backend", "Runner", "RunnerInfo", "names", "resolve", "require"]
