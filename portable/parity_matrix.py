"""`portable parity`: candidates (backends x precisions) checked against CPU FP32 on one or more cache files.

Order of work: every cache file's header is read first (a bad file fails before any model loads); the CPU side of
parity (the FP32 reference and, per precision, the pristine model's calibration for the tolerance) is computed at
most once per cache file and shared by every combination; each combination's runner is loaded once and decodes
every cache file. A combination that cannot run here (backend absent, a precision the backend or provider lacks, a
failed export) becomes a row that says why, and the matrix goes on.

Rows, the printed table and the JSON all come from `Row`'s fields (a field's `md` metadata is its column header).
"""

from __future__ import annotations

import re
import tempfile
import traceback
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterator

import backends
from caches import load_cache, read_metadata
from portable import models, parity, pipeline
from portable.config import RunConfig
from portable.environment import environment
from portable.errors import PortableError

NOT_RUN = "not run"  # could not run here, for a reason the user can act on (a PortableError)
ERROR = "error"  # an unexpected exception: likely a bug, and it fails the run like `diverged`
VERDICTS = ("exact", "within-precision", "diverged", "skipped", NOT_RUN, ERROR)


def col(md: str | None = None, fmt: str = "", default=None):
    return field(default=default, metadata={"md": md, "fmt": fmt})


@dataclass
class Row:
    backend: str = col("backend")
    precision: str = col("precision")
    cache: str = col("cache")
    verdict: str = col("verdict")  # one of VERDICTS
    matched: str | None = col("matched")  # "matched/compared" free-running tokens
    first_divergence: int | None = col("first div")  # the earliest divergent step over the file's sequences
    top1_agreement: float | None = col("top-1 %", ".1f")  # teacher forced
    kl_mean: float | None = col("KL mean", ".3g")
    kl_max: float | None = col("KL max", ".3g")
    max_abs_logit_diff: float | None = col("max Δlogit", ".3g")  # teacher forced, max |Δ| over steps and vocab
    tolerance: float | None = col("tolerance", ".3g")  # computed only when some token differs
    reason: str = col("why", default="")  # why not exact, or why it could not run
    plot: str | None = col()
    parity: dict | None = col()  # the full verdict: mismatches, per-step KL and margins


@dataclass
class MatrixReport:
    model: str | None
    sampling: dict
    max_new_tokens: int
    caches: dict[str, str]  # label -> cache file (or prompt, when the matrix prefilled it)
    rows: list[Row]
    environment: dict
    warnings: list[str] = field(default_factory=list)  # decode's warnings about a cache file, once per file

    def counts(self) -> dict[str, int]:
        return {v: n for v in VERDICTS if (n := sum(r.verdict == v for r in self.rows))}


def run(config: RunConfig, backend_names: list[str], precisions: list[str], caches: dict[str, Path],
        plot_dir: Path | None = None, debug: bool = False) -> MatrixReport:
    """One row per (backend, precision, cache), in that order. `caches`: label -> cache file."""
    for path in caches.values():
        read_metadata(path)  # fails fast on a missing or foreign file
    baselines = {label: _baseline(config.replace(cache_path=path)) for label, path in caches.items()}
    rows, warnings = [], []
    for backend in backend_names:
        for precision in precisions:
            candidate = config.replace(backend=backend, precision=precision, parity=True, quiet=True)
            runners: dict[str, object] = {}  # model spec -> runner, or the exception that kept it from loading
            for label, path in caches.items():
                row = Row(backend=backend, precision=precision, cache=label)
                rows.append(row)
                source, baseline = baselines[label]
                if source.spec not in runners:
                    runners[source.spec] = _attempt(lambda: backends.require(backend, precision).load(candidate,
                                                                                                       source), debug)
                runner = runners[source.spec]
                report = runner if isinstance(runner, Exception) else _attempt(
                    lambda: pipeline.decode(candidate.replace(cache_path=path), runner=runner, baseline=baseline),
                    debug)
                if isinstance(report, Exception):
                    row.verdict = NOT_RUN if isinstance(report, PortableError) else ERROR
                    row.reason = _why(report)
                    continue
                _fill(row, report.parity)
                warnings += [f"{label}: {w}" for w in report.cache.get("warnings", [])
                             if f"{label}: {w}" not in warnings]  # forced identity, prefill not judged
                if plot_dir is not None and report.parity.per_step:
                    from portable.parity_plot import plot

                    name = _slug(f"{backend}-{precision}-{label}") + ".png"
                    row.plot = str(plot(report.parity, f"{backend} {precision} vs CPU FP32, {label}",
                                        Path(plot_dir) / name, sampled=not config.sampling.greedy))
    return MatrixReport(model=config.model, sampling={**asdict(config.sampling), "mode": config.sampling.describe()},
                        max_new_tokens=config.max_new_tokens, caches={k: str(v) for k, v in caches.items()},
                        rows=rows, environment=environment(), warnings=warnings)


def _attempt(fn, debug: bool):
    """fn(), or the exception it raised (a row that says why; the matrix goes on)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001
        if debug:
            traceback.print_exc()
        return e


def _baseline(config: RunConfig) -> tuple[models.ModelSource, pipeline.Baseline | None]:
    cache_cpu = load_cache(config.cache_path)
    source = models.resolve(config.model or cache_cpu.model.get("source"))
    if source.kind == "preset":
        return source, None  # decode reports parity as skipped (random weights)
    return source, pipeline.make_baseline(cache_cpu, source, config)


def _why(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return text if isinstance(e, PortableError) else f"unexpected {type(e).__name__}: {text}"


def _fill(row: Row, result: parity.ParityResult) -> None:
    row.verdict = result.verdict
    row.reason = "" if result.verdict == "exact" and not result.mismatches else result.reason
    if result.verdict == "skipped":
        return
    row.matched = f"{result.matched_tokens}/{result.compared_tokens}"
    firsts = [d for d in result.first_divergence or [] if d is not None]
    row.first_divergence = min(firsts) if firsts else None
    for name in ("top1_agreement", "kl_mean", "kl_max", "max_abs_logit_diff", "tolerance"):
        setattr(row, name, getattr(result, name))
    row.parity = parity.summary(result)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def cache_labels(paths: list[Path]) -> dict[str, Path]:
    """Short unique labels for cache files: the file name, with its folder where two names collide."""
    names = [p.name for p in paths]
    return {(str(p) if names.count(p.name) > 1 else p.name): p for p in paths}


@contextmanager
def prefilled(config: RunConfig, prompts: tuple[str, ...]) -> Iterator[dict[str, Path]]:
    """CPU FP32 cache files of each prompt in a temporary folder (removed afterwards): label -> path."""
    with tempfile.TemporaryDirectory(prefix="portable-parity-") as tmp:
        caches = {}
        for i, prompt in enumerate(prompts, start=1):
            path = Path(tmp) / f"prompt{i}.safetensors"
            pipeline.prefill(RunConfig(model=config.model, prompts=(prompt,), cache_path=path, quiet=True))
            caches[f"prompt {i}"] = path
        yield caches


def notes(report: MatrixReport) -> list[str]:
    """The lines under the table: what each label is, the tally, where the plots went, how the tolerance is set."""
    out = [f"{label}: {text[:60]!r}{'...' if len(text) > 60 else ''}" for label, text in report.caches.items()
           if label.startswith("prompt ")]
    counts = ", ".join(f"{n} {v}" for v, n in report.counts().items())
    out.append(f"Parity vs CPU FP32 ({report.sampling['mode']}, up to {report.max_new_tokens} new tokens): {counts}")
    plots = [r.plot for r in report.rows if r.plot]
    if plots:
        out.append(f"Plots: {len(plots)} PNG files in {Path(plots[0]).parent}")
    if any(r.tolerance is not None for r in report.rows):
        out.append(f"tolerance: max({parity.TOLERANCE_FACTOR:g} x p{parity.TOLERANCE_PERCENTILE:g}, max) of the "
                   f"pristine model's decision-margin error at that precision on CPU (see portable/parity.py)")
    return out


def markdown(rows: list[Row]) -> str:
    shown = [f for f in fields(Row) if f.metadata["md"]]
    cells = [[_cell(getattr(r, f.name), f.metadata["fmt"]) for f in shown] for r in rows]
    keep = [i for i, f in enumerate(shown) if any(c[i] for c in cells) or f.name in ("verdict", "cache")]
    lines = ["| " + " | ".join(shown[i].metadata["md"] for i in keep) + " |",
             "|" + "|".join("---:" if shown[i].metadata["fmt"] or shown[i].name in ("first_divergence", "matched")
                            else "---" for i in keep) + "|"]
    lines += ["| " + " | ".join(c[i] for i in keep) + " |" for c in cells]
    return "\n".join(lines) + "\n"


def _cell(value, fmt: str) -> str:
    if value is None:
        return ""
    text = format(value, fmt) if fmt else str(value)
    return text.replace("|", "\\|").replace("\n", " ")
