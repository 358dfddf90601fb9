import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on the CPU through Triton's interpreter (set before any kernel module is imported).
    os.environ.setdefault("TRITON_INTERPRET", "1")

from tests import models as tiny

ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_collection_modifyitems(config, items):
    skips = {}
    if not torch.cuda.is_available():
        skips["gpu"] = pytest.mark.skip(reason="needs a GPU (none visible)")
    if os.environ.get("TRITON_INTERPRET") != "1":  # on a GPU machine Triton compiles for the GPU: CPU tensors fail
        skips["interpreter"] = pytest.mark.skip(reason="runs Triton kernels on CPU tensors: needs TRITON_INTERPRET=1 "
                                                       "(conftest.py sets it where no GPU is visible)")
    for item in items:
        for mark, skip in skips.items():
            if mark in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def bench_cache_dir(tmp_path, monkeypatch):
    """Peak bandwidths remembered in the test's own folder, never in the user's (the bench tests use it)."""
    monkeypatch.setenv("PORTABLE_CACHE_DIR", str(tmp_path / "user-cache"))
    return tmp_path / "user-cache"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(name, seed=0) -> folder of a tiny model of that architecture (built once per session)."""
    built = {}

    def get(name: str, seed: int = 0) -> Path:
        if (name, seed) not in built:
            built[name, seed] = tiny.build(name, tmp_path_factory.mktemp(f"{name}-{seed}"), seed)
        return built[name, seed]
    return get


def invoke(*args, input=None):
    """The `portable` command line in this process (typer's CliRunner), arguments as strings."""
    from typer.testing import CliRunner

    from portable.cli import app

    return CliRunner().invoke(app, [str(a) for a in args], input=input)


def one_line_error(result, code=2) -> str:
    """A CliRunner result that failed as bad input must: exit `code`, one `error: ` line on stderr, no traceback."""
    assert result.exit_code == code, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture(scope="module")
def made(tiny_model, tmp_path_factory):
    """A tiny Llama and a cache file prefilled from it by `portable prefill`."""
    folder = tiny_model("llama")
    cache = tmp_path_factory.mktemp("cli") / "c.safetensors"
    result = invoke("prefill", "--model", folder, "--out", cache)
    assert result.exit_code == 0, result.output
    return folder, cache, result


def run_cli(*args: str, cwd: Path | None = None, check: bool = True,
            unset: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run a project command in a fresh Python process (as a user would), without the environment variables `unset`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    for name in unset:
        env.pop(name, None)
    proc = subprocess.run([sys.executable, *args], cwd=cwd or ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())
