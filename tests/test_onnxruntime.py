"""The ONNX Runtime backend on the CPU provider.

export -> save -> load in a fresh process -> decode from a prefill cache file is token-exact (fp32) on the embedded
model; a saved artifact is reused without a second export and rebuilt when the model changes or on --rebuild; every
registered architecture decodes (and, where its prefill exports, prefills) to the CPU backend's tokens; fp16 and
int8 are exact or within precision of CPU FP32; bad providers, bf16 and unexportable models fail in one line.

Each model is exported once per session (fixtures below); the artifact store's own contract is in test_artifacts.py.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import pytest

import backends
from backends import onnx_export
from backends import onnxruntime as ort_backend
from caches import load_cache
from portable import architectures, models, pipeline
from portable.artifacts import read_manifest
from portable.config import RunConfig
from portable.errors import PortableError
from tests.conftest import invoke, one_line_error, read_json, run_cli
from tests.models import PROMPTS, TINY_CONFIGS

CPU, CUDA = "CPUExecutionProvider", "CUDAExecutionProvider"
NEW = 24


def artifact_folders(root: Path) -> list[Path]:
    return sorted(p for p in root.iterdir()) if root.exists() else []


# --- the embedded model: export once, decode in a fresh process ------------------------------------------------------

@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
    """A CPU prefill of the embedded model (two prompts of unequal length) and its fp32 ONNX export."""
    root = tmp_path_factory.mktemp("ort-embedded")
    cache = root / "c.safetensors"
    pipeline.prefill(RunConfig(prompts=PROMPTS, cache_path=cache, quiet=True))
    artifacts = root / "artifacts"
    result = invoke("export", "--artifact-dir", artifacts, "--json", root / "export.json")
    assert result.exit_code == 0, result.output
    return {"cache": cache, "artifacts": artifacts, "export": read_json(root / "export.json"), "stdout": result.stdout,
            "root": root}


def test_export_saves_the_graph_and_reports_three_times(embedded):
    report = embedded["export"]
    assert report["reused"] is False and report["backend"] == "onnxruntime" and report["precision"] == "fp32"
    assert report["compile_s"] > 0 and report["save_s"] > 0 and report["load_s"] > 0
    assert "model.onnx" in report["files"] and "artifact.json" in report["files"]
    assert "compile" in embedded["stdout"] and "save" in embedded["stdout"] and "load" in embedded["stdout"]
    manifest = read_manifest(Path(report["artifact"]))
    key = manifest["key"]
    assert key["model"] == models.identity(models.resolve("default"), _config())["fingerprint"]
    assert key["precision"] == "fp32" and key["opset"] == onnx_export.OPSET and key["exporter"].startswith("torch")
    # Optimum / ONNX Runtime GenAI names
    import onnx

    graph = onnx.load(Path(report["artifact"]) / "model.onnx", load_external_data=False).graph
    inputs, outputs = [i.name for i in graph.input], [o.name for o in graph.output]
    assert inputs[:5] == ["input_ids", "attention_mask", "position_ids", "past_key_values.0.key",
                          "past_key_values.0.value"]
    assert outputs[:3] == ["logits", "present.0.key", "present.0.value"] and len(outputs) == 1 + 2 * 6


def _config():
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(models.DEFAULT_MODEL_DIR)


def test_fresh_process_loads_the_saved_graph_and_decodes_exactly(embedded, tmp_path):
    model_file = Path(embedded["export"]["artifact"]) / "model.onnx"
    before = model_file.stat().st_mtime_ns
    run_cli("decode.py", "--backend", "onnxruntime", "--artifact-dir", str(embedded["artifacts"]), "--cache",
            str(embedded["cache"]), "-n", str(NEW), "--ignore-eos", "--json", str(tmp_path / "r.json"), "-q")
    report = read_json(tmp_path / "r.json")
    assert report["parity"]["verdict"] == "exact", report["parity"]
    assert report["parity"]["matched_tokens"] == report["parity"]["compared_tokens"] == 2 * NEW
    timing = report["timing"]
    assert timing["artifact_reused"] is True and timing["compile_s"] is None and timing["save_s"] is None
    assert timing["load_s"] > 0
    assert report["backend_details"]["provider"] == "CPU" and report["backend_details"]["artifact"] == \
        embedded["export"]["artifact"]
    assert model_file.stat().st_mtime_ns == before  # loaded, not written again


def test_reuse_never_exports_again(embedded, monkeypatch):
    def no_export(*args, **kwargs):
        raise AssertionError("exported again")

    monkeypatch.setattr(onnx_export, "export", no_export)
    runner = backends.resolve("onnxruntime").load(RunConfig(artifact_dir=embedded["artifacts"], quiet=True),
                                                  models.resolve("default"))
    assert runner.info.artifact_reused is True and runner.info.compile_s is None
    assert len(artifact_folders(embedded["artifacts"])) == 1


def test_io_binding_path_decodes_the_same_tokens(embedded):
    """The GPU providers' path (cache bound as OrtValues between steps), run here on the CPU provider."""
    from portable.generation import run_decode
    from portable.sampling import Sampler

    config = RunConfig(artifact_dir=embedded["artifacts"], quiet=True, max_new_tokens=NEW, ignore_eos=True)
    source = models.resolve("default")
    cache = load_cache(embedded["cache"])
    tokens = {}
    for binding in (False, True):
        runner = ort_backend.OrtBackend().load(config, source, io_binding=binding)
        assert runner.info.details["io_binding"] is binding
        result = run_decode(runner, cache.to("cpu", runner.dtype), Sampler(config.sampling, cache.batch), NEW,
                            pipeline.make_stopper(runner, config))
        tokens[binding] = result.tokens
    assert tokens[True] == tokens[False] and len(tokens[True][0]) == NEW


def test_prefill_on_onnxruntime_matches_cpu(embedded, tmp_path):
    out = tmp_path / "ort.safetensors"
    pipeline.prefill(RunConfig(prompts=PROMPTS, cache_path=out, backend="onnxruntime",
                               artifact_dir=embedded["artifacts"], quiet=True))
    ours, theirs = load_cache(out), load_cache(embedded["cache"])
    assert ours.prefill["backend"] == "onnxruntime"
    assert ours.next_token_logits.argmax(-1).tolist() == theirs.next_token_logits.argmax(-1).tolist()
    real = ours.attention_mask.bool()
    for a, b in zip(ours.layers, theirs.layers):
        # left-padding slots differ by design (see backends/onnx_export.py); real positions agree
        diff = (a.keys - b.keys).abs().amax(dim=(1, 3))[real]
        assert float(diff.max()) < 1e-4
    tokens = [pipeline.decode(RunConfig(cache_path=path, max_new_tokens=8, ignore_eos=True, parity=False,
                                        quiet=True)).tokens for path in (out, embedded["cache"])]
    assert tokens[0] == tokens[1]


@pytest.mark.parametrize("precision,mode", [("fp16", "native"), ("fp16", "convert"), ("int8", None)])
def test_reduced_precisions_get_a_verdict(embedded, precision, mode, monkeypatch):
    if mode is not None:
        monkeypatch.setitem(ort_backend.FP16_MODE, CPU, mode)
    report = pipeline.decode(RunConfig(cache_path=embedded["cache"], backend="onnxruntime", precision=precision,
                                       artifact_dir=embedded["artifacts"], max_new_tokens=NEW, ignore_eos=True,
                                       quiet=True))
    verdict = report.parity  # a `diverged` verdict here says "likely a bug": of the graph, not of the precision
    assert verdict.verdict in ("exact", "within-precision"), verdict.line()
    assert verdict.compared_tokens == 2 * NEW
    assert report.timing.artifact_reused is False and report.timing.compile_s > 0
    stages = report.backend_details["stages_s"]
    if mode == "native":  # exported in fp16: an fp16 cache
        assert "export" in stages and report.backend_details["cache_dtype"] == "float16"
    else:
        assert "read" in stages and "export" not in stages  # derived from the saved fp32 graph, not exported again
    if precision == "fp16":
        assert report.backend_details["fp16_mode"] == mode
    assert report.backend_details.get("int8_scheme") == ("dynamic" if precision == "int8" else None)


def test_native_fp16_with_the_device_path(embedded, monkeypatch):
    """The default fp16 on every provider (measured on CPU: BENCHMARKS.md), here through the GPU providers' path:
    a native fp16 export (fp16 cache) driven through IO binding."""
    monkeypatch.setitem(ort_backend.DEVICE_MEMORY, CPU, ("cpu", -1))
    report = pipeline.decode(RunConfig(cache_path=embedded["cache"], backend="onnxruntime", precision="fp16",
                                       artifact_dir=embedded["artifacts"], max_new_tokens=NEW, ignore_eos=True,
                                       quiet=True))
    assert report.backend_details["fp16_mode"] == "native" and report.backend_details["io_binding"] is True
    assert report.backend_details["cache_dtype"] == "float16" and report.cache["cast"] == "float32 -> float16"
    assert report.parity.verdict in ("exact", "within-precision"), report.parity.line()


def test_a_damaged_artifact_is_a_one_line_error(tiny_exported, tmp_path):
    folder, root = tiny_exported("llama")
    copy = tmp_path / "artifacts"
    shutil.copytree(root, copy)
    for model in copy.glob("*/model.onnx"):
        model.write_bytes(model.read_bytes()[:1000])
    line = one_line_error(invoke("export", "--model", folder, "--artifact-dir", copy))
    assert "cannot load" in line and "--rebuild" in line
    result = invoke("export", "--model", folder, "--artifact-dir", copy, "--rebuild")
    assert result.exit_code == 0, result.output
    assert "Saved onnxruntime fp32 artifact" in result.stdout


# --- artifacts: reused across runs, rebuilt when the model changes -------------------------------------------------

@pytest.fixture(scope="module")
def tiny_exported(tiny_model, tmp_path_factory):
    """tiny_exported(name) -> (model folder, artifact folder root), exported once per module."""
    root = tmp_path_factory.mktemp("ort-tiny")
    done = {}

    def get(name: str):
        if name not in done:
            folder = tiny_model(name)
            runner = backends.resolve("onnxruntime").load(
                RunConfig(model=str(folder), artifact_dir=root, quiet=True), models.resolve(str(folder)))
            assert runner.info.artifact_reused is False
            done[name] = folder
        return done[name], root
    return get


def test_rebuilt_when_the_model_changes_and_on_rebuild(tiny_exported, tmp_path):
    original, root = tiny_exported("llama")
    folder = tmp_path / "model"
    shutil.copytree(original, folder)
    backend = backends.resolve("onnxruntime")

    def load(**changes):
        config = RunConfig(model=str(folder), artifact_dir=root, quiet=True, **changes)
        return backend.load(config, models.resolve(str(folder))).info

    first = load()
    assert first.artifact_reused is True  # keyed by the weights' fingerprint, not by the folder
    from tests.models import build

    build("llama", folder, seed=1)  # same architecture and shapes, other weights
    changed = load()
    assert changed.artifact_reused is False and changed.compile_s > 0
    assert changed.details["artifact"] != first.details["artifact"]
    assert changed.identity["fingerprint"] != first.identity["fingerprint"]
    assert load().artifact_reused is True
    model_file = Path(changed.details["artifact"]) / "model.onnx"
    before = model_file.stat().st_mtime_ns
    rebuilt = load(rebuild=True)
    assert rebuilt.artifact_reused is False and rebuilt.details["artifact"] == changed.details["artifact"]
    assert model_file.stat().st_mtime_ns != before
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temporary folders left behind


def test_export_that_lost_the_race_says_it_kept_the_other_runs_copy(tiny_exported, tmp_path, monkeypatch):
    """Two runs export one artifact into a shared folder; the one finishing second keeps the first's copy. Its
    message must say so rather than "Saved", since its own files were dropped."""
    folder, done = tiny_exported("llama")
    theirs = next(p for p in done.iterdir() if p.name.startswith("onnx-"))
    shared = tmp_path / "shared"
    real_export = onnx_export.export

    def export_while_another_run_saves(*args, **kwargs):
        result = real_export(*args, **kwargs)
        shutil.copytree(theirs, shared / theirs.name)  # the other run finishes first
        return result

    monkeypatch.setattr(onnx_export, "export", export_while_another_run_saves)
    result = invoke("export", "--model", folder, "--artifact-dir", shared, "--json", tmp_path / "e.json")
    assert result.exit_code == 0, result.output
    line = result.stdout.splitlines()[0]
    assert line.startswith("Built the onnxruntime fp32 artifact") and "another run saved it first" in line, line
    assert str(shared / theirs.name) in line and "Saved" not in result.stdout
    report = read_json(tmp_path / "e.json")
    assert report["details"]["artifact_saved_first_by_another_run"] is True and report["compile_s"] > 0
    assert [p.name for p in shared.iterdir()] == [theirs.name]  # ours dropped, nothing temporary left


def _scale_weight(folder: Path, name: str, factor: float) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    file = folder / "model.safetensors"
    with safe_open(file, "pt") as f:
        metadata = f.metadata()
    tensors = load_file(file)
    tensors[name] = tensors[name] * factor
    save_file(tensors, file, metadata=metadata)


def test_one_changed_weight_changes_the_fingerprint_and_rebuilds_the_graph(tiny_exported, tmp_path):
    """A hand edit of one small tensor (a layer norm, a few hundred bytes of the file) is a different model."""
    original, root = tiny_exported("llama")
    folder = tmp_path / "model"
    shutil.copytree(original, folder)
    assert models.fingerprint(folder) == models.fingerprint(original)  # the content, not the folder
    config = RunConfig(model=str(folder), artifact_dir=root, quiet=True)
    first = backends.resolve("onnxruntime").load(config, models.resolve(str(folder))).info
    assert first.artifact_reused is True
    _scale_weight(folder, "model.layers.1.input_layernorm.weight", 3.0)
    assert models.fingerprint(folder) != models.fingerprint(original)
    changed = backends.resolve("onnxruntime").load(config, models.resolve(str(folder))).info
    assert changed.artifact_reused is False and changed.compile_s > 0
    assert changed.details["artifact"] != first.details["artifact"]
    assert changed.identity["fingerprint"] == models.fingerprint(folder)


def test_the_fingerprint_is_the_same_at_every_load_precision(tiny_model):
    folder = tiny_model("llama")
    source = models.resolve(str(folder))
    fingerprints = {models.load(source, precision=p).identity["fingerprint"] for p in ("fp32", "fp16", "bf16")}
    assert fingerprints == {models.fingerprint(folder)}


# --- every registered architecture -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(architectures.ARCHITECTURES))
def test_every_architecture_decodes_like_the_cpu_backend(name, tiny_exported, tmp_path):
    arch = architectures.ARCHITECTURES[name]
    assert arch.onnx_export, f"{name} is marked as not exportable: this test would not cover it"
    folder, root = tiny_exported(name)
    cache = tmp_path / "c.safetensors"
    pipeline.prefill(RunConfig(model=str(folder), prompts=PROMPTS, cache_path=cache, quiet=True))

    def decode(backend: str, path: Path) -> list[list[int]]:
        return pipeline.decode(RunConfig(model=str(folder), cache_path=path, backend=backend, artifact_dir=root,
                                         max_new_tokens=8, parity=False, quiet=True)).tokens

    expected = decode("cpu", cache)
    assert decode("onnxruntime", cache) == expected
    with pytest.MonkeyPatch.context() as patch:  # the GPU providers' path: the cache bound as OrtValues
        patch.setitem(ort_backend.DEVICE_MEMORY, CPU, ("cpu", -1))
        assert decode("onnxruntime", cache) == expected
    ort_cache = tmp_path / "ort.safetensors"
    config = RunConfig(model=str(folder), prompts=PROMPTS, cache_path=ort_cache, backend="onnxruntime",
                       artifact_dir=root, quiet=True)
    if arch.onnx_prefill:
        pipeline.prefill(config)
        assert load_cache(ort_cache).kinds() == load_cache(cache).kinds()
        assert decode("cpu", ort_cache) == expected
    else:
        with pytest.raises(PortableError, match="only the decode step is exported"):
            pipeline.prefill(config)
        assert not ort_cache.exists()


def test_every_architecture_has_a_tiny_model():
    assert set(architectures.ARCHITECTURES) == set(TINY_CONFIGS)


def test_an_unexportable_model_fails_in_one_line(tmp_path):
    """Gemma 2's attention soft-caps its logits, which the exported attention does not compute."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Gemma2Config

    folder = tmp_path / "gemma2"
    config = Gemma2Config(vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8,
                          pad_token_id=0, bos_token_id=None, eos_token_id=None)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(models.DEFAULT_MODEL_DIR).save_pretrained(folder)
    line = one_line_error(invoke("export", "--model", folder, "--artifact-dir", tmp_path / "art"))
    assert "cannot export gemma2 to ONNX" in line and "soft-capping" in line
    assert artifact_folders(tmp_path / "art") == []  # nothing half-written


def test_a_registry_entry_marked_unexportable_is_refused(monkeypatch, tiny_model, tmp_path):
    entry = architectures.ARCHITECTURES["llama"]
    monkeypatch.setitem(architectures.ARCHITECTURES, "llama", replace(entry, onnx_export=False))
    line = one_line_error(invoke("export", "--model", tiny_model("llama"), "--artifact-dir", tmp_path))
    assert "llama models cannot be exported to ONNX" in line


# --- providers and precisions -----------------------------------------------------------------------------------------

def test_provider_names():
    assert ort_backend.pick_provider(None, [CPU]) == CPU
    assert ort_backend.pick_provider(None, [CUDA, CPU]) == CUDA  # a GPU provider first when there is one
    for name in ("cpu", "CPU", "CPUExecutionProvider", "cpuexecutionprovider"):
        assert ort_backend.pick_provider(name, [CUDA, CPU]) == CPU
    assert ort_backend.pick_provider("cuda", [CUDA, CPU]) == CUDA
    assert ort_backend.pick_provider("MIGraphX", ["MIGraphXExecutionProvider", CPU]) == "MIGraphXExecutionProvider"
    assert ort_backend.pick_provider("dml", ["DmlExecutionProvider", CPU]) == "DmlExecutionProvider"
    with pytest.raises(PortableError) as e:
        ort_backend.pick_provider("ROCm", [CPU, "OpenVINOExecutionProvider"])
    assert "'ROCm' is not available" in str(e.value) and "offers: CPU, OpenVINO" in str(e.value)
    assert "\n" not in str(e.value)


def test_a_provider_that_is_not_installed_is_a_one_line_error(embedded):
    line = one_line_error(invoke("decode", "--cache", embedded["cache"], "--backend", "onnxruntime",
                                 "--ort-provider", "CUDA", "--artifact-dir", embedded["artifacts"]))
    assert "'CUDA' is not available here" in line and "offers: CPU" in line


def test_bf16_is_refused_naming_the_providers_that_run_it(embedded):
    line = one_line_error(invoke("decode", "--cache", embedded["cache"], "--backend", "onnxruntime", "--precision",
                                 "bf16", "--artifact-dir", embedded["artifacts"]))
    assert "bf16 does not run on ONNX Runtime's CPU provider" in line and "CUDA" in line
    with pytest.raises(PortableError, match="int8 does not run on ONNX Runtime's CUDA provider.*CPU"):
        ort_backend.check_precision("int8", CUDA, [CUDA, CPU])
    ort_backend.check_precision("bf16", CUDA, [CUDA, CPU])  # allowed where the kernels exist


def test_export_needs_a_backend_with_artifacts():
    line = one_line_error(invoke("export", "--backend", "cpu"))
    assert "keeps no compiled artifact" in line and "onnxruntime" in line


def test_device_option_is_checked_against_the_provider(embedded):
    line = one_line_error(invoke("decode", "--cache", embedded["cache"], "--backend", "onnxruntime", "--device",
                                 "cuda:1", "--artifact-dir", embedded["artifacts"]))
    assert "--device cuda:1" in line and "CPU provider" in line
    assert ort_backend._device_id("cuda:1", CUDA) == 1 and ort_backend._device_id(None, CUDA) == 0


def test_the_fingerprint_is_hashed_once_per_process_until_a_file_changes(tiny_model, tmp_path, monkeypatch):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model("llama"), folder)
    hashed = []
    digest = models._file_digest
    monkeypatch.setattr(models, "_file_digest", lambda file: hashed.append(file.name) or digest(file))
    first = models.fingerprint(folder)
    assert models.fingerprint(folder) == first and hashed == ["model.safetensors"]  # the second call read nothing
    _scale_weight(folder, "model.layers.1.input_layernorm.weight", 3.0)
    assert models.fingerprint(folder) != first and hashed == ["model.safetensors"] * 2
