"""Finding, loading and fingerprinting models.

`--model` takes `default` (the embedded model shipped in portable/data/default_model), a local Hugging Face folder,
a hub id (resolved through the local Hugging Face cache, and downloaded only where the hub is reachable), or
`preset:NAME` (a published config with random weights, for speed work; see portable/presets.py).

A model's identity is recorded in every cache file so that decode can refuse a cache from another model. The
fingerprint covers the config and every byte of every weight file (the safetensors header with names, shapes and
dtypes, then each value as stored): one changed weight changes it. It is read from the files, never from the loaded
tensors, so it is the same on every device and at every load precision. It stays cheap by hashing the files in
16 MiB pieces on all cores (SHA-256 releases the GIL), once per process for unchanged files: 26 ms for the embedded
model's 18 MB and 0.85 s for 2.5 GiB (a 1B model in bf16) in the page cache on 2 cores (BENCHMARKS.md); reading cold
files is bounded by the disk. Caches written before this scheme hold a sampled fingerprint
(prefix `sha256:`, 64 windows of 4 KiB) that cannot be compared with this one: decode says so (`older_fingerprint`).
"""

from __future__ import annotations

import functools
import hashlib
import json
import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from portable.errors import ModelLoadError

DEFAULT_MODEL_DIR = Path(__file__).parent / "data" / "default_model"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_CONFIG_KEYS_IGNORED = {"_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures",
                        "use_cache", "output_attentions", "output_hidden_states", "attn_implementation"}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "vocab.txt")


@dataclass(frozen=True)
class ModelSource:
    spec: str  # as the user wrote it ("default" for the embedded model)
    kind: str  # "embedded" | "local" | "hub" | "preset"
    path: Path | None = None  # the local folder holding config and weights (None for presets)

    @property
    def display(self) -> str:
        return "embedded default model" if self.kind == "embedded" else self.spec


def resolve(spec: str | None) -> ModelSource:
    """Turn a `--model` value into a local source, or fail with a message that says what to do."""
    if spec in (None, "", "default"):
        if not (DEFAULT_MODEL_DIR / "config.json").exists():
            raise ModelLoadError(f"the embedded default model is missing from {DEFAULT_MODEL_DIR} (broken install?)")
        return ModelSource("default", "embedded", DEFAULT_MODEL_DIR)
    if spec.startswith("preset:"):
        from portable import presets

        presets.get(spec.removeprefix("preset:"))  # raises with the list of presets
        return ModelSource(spec, "preset")
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelLoadError(f"{path} is not a Hugging Face model folder (no config.json)")
        return ModelSource(spec, "local", path.resolve())
    if spec.startswith((".", "/", "~")) or os.sep in spec and spec.count("/") > 1:
        raise ModelLoadError(f"model folder {spec} does not exist")
    return ModelSource(spec, "hub", _hub_snapshot(spec))


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass  # not in the local Hugging Face cache: try the hub below
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise ModelLoadError(f"{repo_id!r} is not a local folder and not in the Hugging Face cache, and HF_HUB_OFFLINE "
                             f"is set; download it where the hub is reachable and pass its folder with --model PATH")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns, etag_timeout=10))
    except RepositoryNotFoundError as e:
        raise ModelLoadError(f"no model {repo_id!r} on the Hugging Face Hub (or it is private), and no local folder "
                             f"of that name") from e
    except Exception as e:
        raise ModelLoadError(f"{repo_id!r} is not a local folder and the Hugging Face Hub could not be reached "
                             f"({type(e).__name__}); this machine may be offline: download the model where the hub "
                             f"is reachable and pass its folder with --model PATH") from e


def _config_digest(path: Path) -> bytes:
    config = json.loads((path / "config.json").read_text())
    kept = {k: v for k, v in config.items() if k not in _CONFIG_KEYS_IGNORED}
    return json.dumps(kept, sort_keys=True).encode()


_PIECE = 16 << 20  # bytes hashed per task


def _file_digest(file: Path) -> bytes:
    """SHA-256 of each 16 MiB piece of the file, in file order (a two-level hash that spreads over the cores)."""
    size = file.stat().st_size
    if size == 0:
        return hashlib.sha256().digest()
    with open(file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        def piece(start: int) -> bytes:
            with memoryview(data)[start:start + _PIECE] as view:
                return hashlib.sha256(view).digest()

        starts = range(0, size, _PIECE)
        with ThreadPoolExecutor(min(len(starts), os.cpu_count() or 1)) as pool:
            return b"".join(pool.map(piece, starts))


def fingerprint(path: Path) -> str:
    """Config + the full content of every weight file of a model folder (see module docstring). Computed once per
    process for the same files: a decode with parity loads the model up to three times (candidate, CPU FP32
    reference, calibration), and hashing a 1B model costs about a second each time."""
    weights = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.bin"))
    stamp = tuple((f.name, st.st_size, st.st_mtime_ns) for f in [path / "config.json", *weights] for st in [f.stat()])
    return _fingerprint(path.resolve(), stamp)


@functools.lru_cache(maxsize=16)
def _fingerprint(path: Path, stamp: tuple) -> str:
    """`stamp` (name, size, mtime of config and weight files) keys the cache: a rewritten file is hashed again."""
    h = hashlib.sha256(_config_digest(path))
    for name, size, _ in stamp[1:]:
        h.update(f"{name}:{size}".encode())
        h.update(_file_digest(path / name))
    return "sha256-full:" + h.hexdigest()[:32]


def older_fingerprint(value: str | None) -> bool:
    """A fingerprint of the sampled scheme (prefix `sha256:`) that caches written before full hashing hold."""
    return bool(value) and value.startswith("sha256:")


def tokenizer_fingerprint(path: Path | None) -> str | None:
    if path is None:
        return None
    h = hashlib.sha256()
    found = False
    for name in _TOKENIZER_FILES:
        file = path / name
        if file.exists():
            h.update(name.encode())
            h.update(file.read_bytes())
            found = True
    return "sha256:" + h.hexdigest()[:32] if found else None


def identity(source: ModelSource, config) -> dict:
    """What a cache file records about the model that made it."""
    if source.kind == "preset":
        from portable import presets

        fp = presets.fingerprint(source.spec.removeprefix("preset:"))
        tok = None
    else:
        fp, tok = fingerprint(source.path), tokenizer_fingerprint(source.path)
    text = config.get_text_config(decoder=True)
    return {
        "architecture": (config.architectures or [type(config).__name__])[0],
        "model_type": config.model_type,
        "source": source.spec,
        "fingerprint": fp,
        "tokenizer_fingerprint": tok,
        "num_layers": text.num_hidden_layers,
        "vocab_size": text.vocab_size,
    }


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object | None  # a transformers tokenizer (presets: a byte tokenizer); None if the folder has none
    config: object
    identity: dict
    load_s: float


def load(source: ModelSource, precision: str = "fp32", device: str = "cpu", attn: str = "sdpa") -> LoadedModel:
    """Load weights in `precision` onto `device` with the given attention implementation, in eval mode."""
    from transformers import AutoModelForCausalLM

    quiet_transformers()
    start = time.perf_counter()
    dtype = DTYPES[precision]
    if source.kind == "preset":
        from portable import presets

        model = presets.build(source.spec.removeprefix("preset:"), dtype=dtype, device=device, attn=attn)
        tokenizer = presets.ByteTokenizer()
    else:
        kwargs = {} if _attention_free(source.path) else {"attn_implementation": attn}
        try:
            model = AutoModelForCausalLM.from_pretrained(source.path, dtype=dtype, **kwargs)
        except (OSError, ValueError, ImportError) as e:
            first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ModelLoadError(f"cannot load {source.display} with attention {attn!r}: {first_line}") from e
        model = model.to(device)
        tokenizer = load_tokenizer(source)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, config=model.config, identity=identity(source, model.config),
                       load_s=time.perf_counter() - start)


def _attention_free(path: Path) -> bool:
    """Recurrent models (Mamba) take no attention implementation."""
    from portable.architectures import ARCHITECTURES

    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ModelLoadError(f"cannot read {path / 'config.json'}: {e}") from e
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path / 'config.json'} is not a model config (not a JSON object)")
    model_type = config.get("model_type")
    return any(a.model_type == model_type and a.cache_kinds == ("recurrent",) for a in ARCHITECTURES.values())


def quiet_transformers() -> None:
    """No per-load progress bars or advisory warnings from transformers on our users' terminals."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def load_tokenizer(source: ModelSource):
    # The fast tokenizer's thread pool, once woken by a long prompt, keeps competing with PyTorch's threads for the
    # cores: a 2,048-token prefill on 2 cores measured 10x slower in some runs. Users can still set it themselves.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers import AutoTokenizer

    if tokenizer_fingerprint(source.path) is None and not (source.path / "tokenizer_config.json").exists():
        return None
    try:
        return AutoTokenizer.from_pretrained(source.path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load the tokenizer of {source.display}: {e}") from e
