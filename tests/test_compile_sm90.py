"""The decode step's Triton kernels compile for an sm_90 GPU, checked without one (tests/compile_sm90.py): the
interpreter that runs them in CI takes what the GPU compiler refuses, and a GPU is lent rarely."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT

# every precision of the embedded model, and the real shapes of the presets (2 layers): the Llama and Qwen3 issue-7
# shapes in bf16 and int8, Gemma3 (GeGLU, 1 + w norms, sliding layers, head_dim 256) and Mistral (4096 wide)
SPECS = ["default:fp32", "default:bf16", "default:fp16", "default:int8", "preset:llama-3.2-1b:bf16",
         "preset:llama-3.2-1b:int8", "preset:qwen3-1.7b:bf16", "preset:gemma3-1b:bf16", "preset:mistral-7b:bf16"]
KERNELS = {"_embed_kernel", "_gemv_kernel", "_rope_attn_partial_kernel", "_combine_oproj_kernel",
           "_attn_combine_kernel", "_advance_kernel", "_rmsnorm_kernel", "_gated_kernel", "_int8_mm_kernel"}


@pytest.mark.slow
def test_every_decode_kernel_compiles_for_an_sm90_gpu(tmp_path):
    env = {**os.environ, "TRITON_CACHE_DIR": str(tmp_path / "triton")}  # a cold cache: each kernel really compiles
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "compile_sm90.py"), *SPECS], capture_output=True,
                          text=True, env=env, timeout=900)
    records = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode == 3:
        pytest.skip(records[-1]["reason"])
    failed = [r for r in records if r["event"] == "failed"]
    assert failed[:1] and failed[0]["kernel"] == "_dot_k8", done.stdout[-2000:] + done.stderr[-2000:]  # the harness
    # compiles for real: a dot Triton refuses on NVIDIA failed before our kernels
    assert failed[1:] == [] and done.returncode == 0, done.stderr[-2000:]
    assert [r["spec"] for r in records if r["event"] == "model"] == [s for s in SPECS for _ in (1, 2)]
    assert {r["kernel"] for r in records if r["event"] == "compiled"} == KERNELS
