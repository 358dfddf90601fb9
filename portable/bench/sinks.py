"""Output: md (default), csv, json, jsonl — every format's columns come from `Result`'s fields, written once there.

    json    a list of records, each with every sample and the environment
    jsonl   one record per line
    csv     one row per record; lists and dicts as JSON text, the environment as env.* columns
    md      a table of the fields that have an `md` header (constant identifying columns go to the line above it),
            then our/peer ratios and notes (timed regions, parity, errors)
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, fields
from pathlib import Path

from portable.bench.result import Result
from portable.errors import PortableError
from caches.fileformat import atomic_file

FORMATS = ("md", "csv", "json", "jsonl")
NOISY = 0.1  # a relative stdev of t/s above this is flagged in the md notes

TIMED = {
    "pp": "ppN: one prefill forward of N tokens per sequence, between device synchronisations",
    "tg": "tgN: N decode steps (forward + pick: greedy on the device, sampled on the host; tokens read back every "
          "`sync` steps) from a "
          "1-token prompt, or from a D-token cache file reloaded for each repetition (@dD, reload untimed)",
    "pg": "pgP,G and suite configs: prefill + generation end to end; t/s counts prompt + generated tokens "
          "(llama-bench), E2E t/s generated tokens only (seed 003)",
}


def records(results: list[Result]) -> list[dict]:
    return [asdict(r) for r in results]


def render(results: list[Result], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(records(results), indent=1) + "\n"
    if fmt == "jsonl":
        return "".join(json.dumps(r) + "\n" for r in records(results))
    if fmt == "csv":
        return to_csv(results)
    if fmt == "md":
        return markdown(results)
    raise PortableError(f"unknown output format {fmt!r}; choose from {', '.join(FORMATS)}")


def format_for(path: Path, fmt: str | None) -> str:
    """The format of an output file: as given, or from its suffix."""
    fmt = fmt or Path(path).suffix.lstrip(".").lower()
    if fmt not in FORMATS:
        raise PortableError(f"cannot tell the output format of {path}; name it .md, .csv, .json or .jsonl, or pass "
                            f"--format")
    return fmt


def write(text: str, path: Path) -> None:
    """Write atomically: a half-written file never replaces a good one."""
    with atomic_file(path, "w") as f:
        f.write(text)


def to_csv(results: list[Result]) -> str:
    data = records(results)
    env_keys = sorted({k for r in data for k in r["environment"]})
    names = [f.name for f in fields(Result) if f.name != "environment"]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(names + [f"env.{k}" for k in env_keys])
    for r in data:
        row = [_cell(r[n]) for n in names] + [_cell(r["environment"].get(k)) for k in env_keys]
        writer.writerow(row)
    return out.getvalue()


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _md_value(result: Result, f) -> str:
    value = getattr(result, f.name)
    if value is None or value == "":
        return ""
    digits = f.metadata["digits"]
    text = f"{value:.{digits}f}" if isinstance(value, float) else str(value)
    pm = f.metadata["pm"]
    if pm and getattr(result, pm) is not None:
        text += f" ± {getattr(result, pm):.{digits}f}"
    return text


def markdown(results: list[Result]) -> str:
    if not results:
        return "no results\n"
    shown = [f for f in fields(Result) if f.metadata.get("md")]
    cells = {f.name: [_md_value(r, f) for r in results] for f in shown}
    header, columns = [], []
    for f in shown:
        values = cells[f.name]
        if not any(values):
            continue
        if f.metadata["ident"] and len(set(values)) == 1:
            header.append(f"{f.metadata['md']}: {values[0]}")
        else:
            columns.append(f)
    lines = [" | ".join(header), ""] if header else []
    lines.append("| " + " | ".join(f.metadata["md"] for f in columns) + " |")
    lines.append("|" + "|".join("---" if f.metadata["ident"] or f.name in ("test", "config") else "---:"
                                for f in columns) + "|")
    for i in range(len(results)):
        lines.append("| " + " | ".join(cells[f.name][i] for f in columns) + " |")
    ratios = ratio_table(results)
    if ratios:
        lines += ["", ratios.rstrip("\n")]
    lines += [""] + [f"- {n}" for n in notes(results)]
    return "\n".join(lines) + "\n"


def _point(r: Result) -> tuple:
    return (r.model, r.backend, r.precision, r.attn, r.test, r.config, r.batch, r.threads, r.sampling)


def ratio_table(results: list[Result]) -> str | None:
    """Our t/s against each peer's on the same points: ratio > 1 means we are faster."""
    ours = [r for r in results if r.engine == "portable" and r.vs_peer]
    if not ours:
        return None
    engines = list(dict.fromkeys(e for r in ours for e in r.vs_peer))
    peers = {(_point(r), r.engine): r for r in results if r.engine != "portable"}
    head = ["model", "backend", "precision", "test", "batch", "ours t/s"] + [
        x for e in engines for x in (f"{e} t/s", f"ours/{e}")]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---|---|---:|" + "---:|" * (1 + 2 * len(engines))]
    for r in ours:
        row = [r.model, r.backend, r.precision, r.config or r.test, str(r.batch), f"{r.tps_median:.2f}"]
        for e in engines:
            peer = peers.get((_point(r), e))
            row.append(f"{peer.tps_median:.2f}" if peer is not None and peer.tps_median else peer.status if peer
                       else "")
            row.append(f"{r.vs_peer[e]:.2f}x" if e in r.vs_peer else "")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


_NAMED = {"model": "", "backend": "", "precision": "", "attn": "", "kernels": "", "threads": "t", "sync_every": "sync"}


def _naming(results: list[Result]) -> list[str]:
    """The identifying fields whose values differ between rows: a note names its row by them, as the table does."""
    return [n for n in _NAMED if len({getattr(r, n) for r in results}) > 1]


def _name(r: Result, naming: list[str], skip: tuple[str, ...] = ()) -> str:
    return "".join(f" {_NAMED[n]}{getattr(r, n)}" for n in naming if n not in skip and getattr(r, n) is not None)


def notes(results: list[Result]) -> list[str]:
    out = []
    naming = _naming(results)
    kinds = {r.test[:2] for r in results}
    out += [f"timed: {TIMED[k]}" for k in ("pp", "tg", "pg") if k in kinds]
    out.append("mean ± stdev over repetitions after warm-up; median t/s = tokens / median time; P50/P95 over every "
               "decode step of every repetition; JSON keeps every sample")
    if any((r.sync_every or 1) > 1 and r.step_p50_ms is not None for r in results):
        out.append("with sync N > 1 the N steps between two read-backs share their time equally (P50/P95 of those)")
    out += [f"parity: {p}" for p in dict.fromkeys(r.parity for r in results if r.parity)]
    noisy = [r for r in results
             if r.ok and r.tps_mean and r.tps_stdev is not None and r.tps_stdev > NOISY * r.tps_mean]
    if noisy:
        rows = ", ".join(f"{r.engine}{_name(r, naming)} {r.config or r.test} b{r.batch} "
                         f"({100 * r.tps_stdev / r.tps_mean:.0f}%)" for r in noisy)
        advice = "; on a busy CPU, try --threads 1" if any(r.threads != 1 for r in noisy) else ""
        out.append(f"noisy (stdev over {100 * NOISY:.0f}% of the mean): {rows}; the device may be shared or "
                   f"throttling{advice}")
    missing = sorted({r.device for r in results if r.gbps is not None and r.pct_peak is None})
    if missing:
        out.append(f"no measured peak bandwidth for {', '.join(missing)}: run `portable bench --measure-peak` once "
                   f"(with the same --backend) for % of peak")
    for r in results:
        if not r.ok:
            out.append(f"{r.engine} {r.config or r.test} batch {r.batch} {r.backend} {r.precision}"
                       f"{_name(r, naming, ('backend', 'precision'))}: {r.status}"
                       + (f" ({r.error})" if r.error else ""))
    return out
