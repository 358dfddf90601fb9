"""`portable bench kernels`: the Triton kernels' micro-benchmarks, run through Triton's interpreter here."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from portable.cli import app
from tests.conftest import run_cli

cli = CliRunner()


def invoke(*args):
    return cli.invoke(app, ["bench", *map(str, args)])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown without a GPU")
def test_kernels_need_a_gpu_or_the_interpreter_flag(tmp_path):
    result = invoke("kernels", "-o", tmp_path)
    assert result.exit_code == 2 and "needs a GPU" in result.output and "--interpret" in result.output


def test_kernels_in_the_interpreter_write_tables_and_plots(tmp_path):
    """In a fresh process without TRITON_INTERPRET, as a user runs it (also on a GPU machine)."""
    result = run_cli("-m", "portable", "bench", "kernels", "--interpret", "-k",
                     "rmsnorm,gemv,attention,attention_oproj", "--dtype", "fp32", "-o", str(tmp_path),
                     unset=("TRITON_INTERPRET",))
    for name in ("rmsnorm", "gemv", "attention", "attention_oproj"):
        png = tmp_path / f"{name}-fp32.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        rows = (tmp_path / f"{name}-fp32.csv").read_text().splitlines()
        assert len(rows) == 3 and "Triton GB/s" in rows[0]
    assert "speed-up" in result.stdout


def test_kernels_help_lists_every_kernel():
    """`bench kernels --help` names every kernel that `-k` accepts (docs/benchmarks.md lists them too)."""
    from portable.bench import kernels as bench_kernels

    result = cli.invoke(app, ["bench", "kernels", "--help"], env={"COLUMNS": "400"})
    assert result.exit_code == 0
    listed = result.output.split("Kernels to time (default all):")[1].split(".")[0]
    assert [name.strip() for name in listed.split(",")] == list(bench_kernels.KERNELS)

@pytest.mark.interpreter
def test_the_attention_oproj_case_does_the_same_job_on_both_sides():
    """The micro-benchmark compares like with like: the fused kernels and the PyTorch reference leave the same
    residual (both start from the same caches, each adds W_o . attention once)."""
    from backends import kernels as k
    from backends.kernels import activation, attention, gemv, norms, rope  # noqa: F401  (as _kernel_modules does)
    from portable.bench import kernels as bench_kernels

    fns, nbytes = bench_kernels._case_attention_oproj(k, bench_kernels.TINY, 16, torch.float32, torch.device("cpu"))
    h_fused = fns["triton"]().clone()
    h_both = fns["torch"]()  # the same residual tensor: now holds both additions
    assert nbytes > 0 and h_fused.abs().sum() > 0
    assert torch.allclose(h_both, 2 * h_fused, rtol=1e-4, atol=1e-5)
