"""benchmarks/gpu_suite.sh against the device's limit of one command (600 s): it refuses, before any work, parts whose
time limits add up past it, and the groups its error names fit."""

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_suite.sh"


def run(*parts: str, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *parts], cwd=ROOT, env={**os.environ, "OUT": str(out)},
                          capture_output=True, text=True, timeout=60)


def test_parts_past_one_command_are_refused_before_any_work(tmp_path):
    for parts in ((), ("env", "tests", "bench")):
        proc = run(*parts, out=tmp_path / "out")
        assert proc.returncode == 2 and "COMMAND_LIMIT=600" in proc.stderr, proc.stderr
        assert not (tmp_path / "out").exists()  # nothing ran, not even the results folder


def test_the_named_groups_fit_one_command_and_cover_every_part():
    text = SCRIPT.read_text()
    limits = {k: int(v) for k, v in re.findall(r"\[(\w+)\]=(\d+)", re.search(r"declare -A LIMIT=\((.*)\)",
                                                                                text).group(1))}
    groups = [g.split() for g in re.search(r"run them in groups: ([^\"]+)\"", text).group(1).split("|")]
    assert sorted(p for g in groups for p in g) == sorted(limits)
    assert all(sum(limits[p] for p in g) <= 600 for g in groups), groups
