"""Low-level reading and writing of a `.safetensors` file with a payload checksum.

The file is a standard safetensors file (8-byte little-endian header length, JSON header, tensor bytes), so the
`safetensors` library and any other reader open it. We write and read it ourselves for three reasons: the CRC-32 of
the tensor payload is stored in the header and computed while the bytes stream past (no second pass), and so is a
CRC-32 of the header itself (a flipped dtype code such as `I64` -> `F64` keeps every byte range valid and would
otherwise reinterpret a tensor in silence); the write is atomic (temporary file in the same folder, fsync, rename)
and the file gets the mode a plain `open()` would give it (0666 less the umask); and every way a header can be wrong
becomes a `CacheFileError` naming the problem, never a crash deep inside a parser.

Speed (issue 3 asks for >= 70% of the disk's sequential speed; `benchmarks/cache_io.py` measures it): the payload is
checksummed in 4 MiB chunks on a helper thread while the main thread reads or writes the next ones, with ISA-L's
CRC-32 where python-isal is installed (11 GB/s against zlib's 3 GB/s on a 2-core Xeon virtual machine, where it made
saves and loads 25-40% faster). A read goes into one preallocated buffer that the tensors then view in place.
"""

from __future__ import annotations

import json
import os
import secrets
import struct
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterable, Iterator

import torch

from portable.errors import CacheFileError

try:  # the same CRC-32 as zlib's, about 4x faster (ISA-L's carry-less multiply kernels), where python-isal is installed
    from isal.isal_zlib import crc32 as _crc32
except ImportError:
    from zlib import crc32 as _crc32

CHECKSUM_KEY = "payload_crc32"
# CRC-32 of the header's JSON bytes (padding included) with this key's own eight digits read as "00000000". Files
# without it still load here: whether it is required is the caller's call (caches/store.py: when `checksums` lists it).
HEADER_CHECKSUM_KEY = "header_crc32"
MAX_HEADER_BYTES = 100 * 2**20
_CHUNK = 4 * 2**20  # read and checksum granularity: a 12 MB cache still overlaps its reading and its checksum

DTYPE_CODES: dict[torch.dtype, str] = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


def _as_bytes(t: torch.Tensor) -> memoryview:
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).reshape(-1).numpy())


class _Checksum:
    """The CRC-32 of chunks fed in order, computed on one helper thread while the caller reads or writes the next
    chunk (both zlib and ISA-L release the GIL). Use as a context manager; `value()` waits for the last chunk."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1)  # one worker: chunks are taken in the order they were fed
        self._pending: list[Future] = []
        self._crc = 0

    def __enter__(self) -> "_Checksum":
        return self

    def __exit__(self, *exc) -> None:
        self._pool.shutdown(wait=True)

    def feed(self, chunk: memoryview) -> None:
        self._pending.append(self._pool.submit(self._update, chunk))

    def _update(self, chunk: memoryview) -> None:
        self._crc = _crc32(chunk, self._crc)

    def value(self) -> int:
        for done in self._pending:
            done.result()  # re-raises a failure inside the worker
        return self._crc


def _chunks(views: Iterable[memoryview]) -> Iterable[memoryview]:
    for view in views:
        for pos in range(0, len(view), _CHUNK):
            yield view[pos:pos + _CHUNK]


def _write_all(f, view: memoryview) -> None:
    """An unbuffered write may take fewer bytes than given (Linux: at most 2 GiB a call): write until all are."""
    while view:
        view = view[f.write(view):]


def create_temp(path: Path) -> tuple[int, Path]:
    """Create a new temporary file next to `path` for an atomic replace: (fd, temporary path).

    Unlike `tempfile.mkstemp` (always 0600) the file is created with mode 0666 and the kernel applies the umask, so the
    renamed file has the mode any other new file of the user would have; no racy `os.umask()` query is needed.
    """
    while True:
        tmp = path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:
            continue


@contextmanager
def atomic_file(path: Path, mode: str = "wb", newline: str | None = None) -> Iterator[IO]:
    """A file to write `path`'s new content into, renamed over `path` when the block ends and removed if it fails:
    an interrupted or failed write never leaves half a file where a good one was (reports, tables, plots)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = create_temp(path)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"newline": newline})) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _stamp(raw: bytes, key: str, value: int) -> bytes:
    """`raw` with the eight digits after `"key":"` (its last occurrence) set to `value` in hex."""
    at = raw.rindex(f'"{key}":"'.encode()) + len(key) + 4
    return raw[:at] + f"{value:08x}".encode() + raw[at + 8:]


def header_matches(raw: bytes, recorded: object) -> bool:
    """Whether header bytes `raw`, whose `header_crc32` holds `recorded`, have that CRC-32 (its digits read as 0)."""
    if not isinstance(recorded, str) or len(recorded) != 8:
        return False
    field = f'"{HEADER_CHECKSUM_KEY}":"{recorded}"'.encode()
    at = raw.rfind(field)
    if at < 0:
        return False
    zeroed = raw[:at] + f'"{HEADER_CHECKSUM_KEY}":"00000000"'.encode() + raw[at + len(field):]
    return f"{_crc32(zeroed):08x}" == recorded


def write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> int:
    """Write `tensors` and string `metadata` to `path` atomically; returns the file size in bytes.

    The payload CRC-32 is added to the metadata under `payload_crc32` and the header's under `header_crc32`: the header
    goes out with placeholder digits, the payload is written while a helper thread checksums it, and the header is
    written again with both checksums filled in before the fsync.
    """
    views, header, offset = {}, {}, 0
    # Widest dtypes first: every tensor then starts at a multiple of its own element size, so a reader can view the
    # bytes in place without copying (safetensors allows no gaps between tensors to align them otherwise).
    for name, t in sorted(tensors.items(), key=lambda item: -item[1].element_size()):
        if t.dtype not in DTYPE_CODES:
            raise ValueError(f"cannot store dtype {t.dtype} ({name})")
        views[name] = _as_bytes(t)
        header[name] = {"dtype": DTYPE_CODES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(views[name])]}
        offset += len(views[name])
    metadata = {k: v for k, v in metadata.items() if k not in (CHECKSUM_KEY, HEADER_CHECKSUM_KEY)}
    # The last keys of the last entry, found by _stamp's rindex (inside the `portable` JSON string quotes are escaped).
    header["__metadata__"] = {**metadata, CHECKSUM_KEY: "0" * 8, HEADER_CHECKSUM_KEY: "0" * 8}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the payload to 8 bytes

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _Checksum() as checksum:
        for chunk in _chunks(views.values()):
            checksum.feed(chunk)
        fd, tmp = create_temp(path)
        try:
            with os.fdopen(fd, "wb", buffering=0) as f:
                _write_all(f, memoryview(struct.pack("<Q", len(raw)) + raw))
                for chunk in _chunks(views.values()):
                    _write_all(f, chunk)
                raw = _stamp(raw, CHECKSUM_KEY, checksum.value())
                raw = _stamp(raw, HEADER_CHECKSUM_KEY, _crc32(raw))
                f.seek(8)
                _write_all(f, memoryview(raw))
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException as e:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(e, OSError):  # a full disk, a file size limit, a vanished folder: one line, not a crash
                raise CacheFileError(f"cannot write {path}: {e.strerror or e}") from e
            raise
    return 8 + len(raw) + offset


def read_header(path: Path, strict: bool = True) -> tuple[dict, int, int]:
    """Parse and check the header of `path`: returns (header, payload start, file size).

    `strict=False` (for `cache inspect` of a damaged file) only parses it: no header checksum, no byte-range checks.
    """
    path = Path(path)
    with _open(path) as f:
        return _read_header(f, path, strict)


def _open(path: Path):
    """`path` opened for reading, or one line saying why it cannot be."""
    if not path.exists():
        raise CacheFileError(f"cache file {path} does not exist")
    if path.is_dir():
        raise CacheFileError(f"cache file {path} is a directory")
    try:
        return open(path, "rb", buffering=0)
    except OSError as e:
        raise CacheFileError(f"cannot read cache file {path}: {e.strerror or e}") from e


def _read_upto(f, n: int) -> bytes:
    """`n` bytes of the unbuffered file `f` (one read may return fewer), or all it has left."""
    parts = []
    while n > 0:
        part = f.read(n)
        if not part:
            break
        parts.append(part)
        n -= len(part)
    return b"".join(parts)


def _read_header(f, path: Path, strict: bool = True) -> tuple[dict, int, int]:
    """read_header() of the open file `f`, left positioned at the payload. Its size comes from the open file too: a
    file replaced meanwhile (a concurrent `prefill --out` of the same path) is not mixed with the one opened."""
    try:
        size = os.fstat(f.fileno()).st_size
        head = _read_upto(f, 8)
        if len(head) < 8:
            raise CacheFileError(f"{path} is not a cache file: {size} bytes is too short for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES or n > size - 8:
            what = "truncated" if n <= MAX_HEADER_BYTES else "not a safetensors file"
            raise CacheFileError(f"{path} is {what}: its header claims {n} bytes but the file has {size}")
        raw = _read_upto(f, n)
    except OSError as e:
        raise CacheFileError(f"cannot read cache file {path}: {e.strerror or e}") from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CacheFileError(f"{path} has a corrupt header (not valid JSON: {e})") from e
    if not isinstance(header, dict):
        raise CacheFileError(f"{path} has a corrupt header (not a JSON object)")
    if strict:
        meta = header.get("__metadata__")
        recorded = meta.get(HEADER_CHECKSUM_KEY) if isinstance(meta, dict) else None
        if recorded is not None and not header_matches(raw, recorded):
            raise CacheFileError(f"{path} has a corrupt header: header checksum does not match the recorded "
                                 f"{recorded!r} (the file was modified or damaged after it was written)")
        _check_entries(path, header, size - 8 - n)
    return header, 8 + n, size


def _check_entries(path: Path, header: dict, payload_size: int) -> None:
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CacheFileError(f"{path} has a corrupt header (metadata must map strings to strings)")
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = CODE_DTYPES[entry["dtype"]]
            shape, offsets = list(entry["shape"]), list(entry["data_offsets"])
            # JSON integers only: read() uses them as they are ("29", 29.5 or true would pass int() here and then
            # crash a slice or a reshape; Infinity would overflow it)
            if not all(type(n) is int for n in shape + offsets):
                raise TypeError("shape and data_offsets must be integers")
            start, end = offsets
        except (KeyError, TypeError, ValueError) as e:
            raise CacheFileError(f"{path} has a corrupt header entry for tensor {name!r}: {entry!r}") from e
        numel = 1
        for s in shape:
            if s < 0:
                raise CacheFileError(f"{path}: tensor {name!r} has a negative dimension {shape}")
            numel *= s
        if end - start != numel * dtype.itemsize or start < 0:
            raise CacheFileError(f"{path}: tensor {name!r} of shape {shape} ({entry['dtype']}) does not fit its "
                                 f"byte range {start}..{end}")
        if end > payload_size:
            raise CacheFileError(f"{path} is truncated: tensor {name!r} ends at byte {end} of the payload but the "
                                 f"payload has only {payload_size}")
        spans.append((start, end, name))
    spans.sort()
    previous_end, previous_name = 0, None
    for s, e, name in spans:
        if s != previous_end:
            what = "overlap" if s < previous_end else "leave a gap"
            raise CacheFileError(f"{path} has a corrupt header: tensors {previous_name!r} and {name!r} {what}")
        previous_end, previous_name = e, name
    if previous_end != payload_size:
        raise CacheFileError(f"{path} has {payload_size - previous_end} unexpected bytes after its last tensor")


def read(path: Path, verify: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every tensor of `path` into memory (one sequential read) and check the payload CRC-32.

    Each chunk is checksummed on a helper thread as soon as it has been read, while the next one is read, so checking
    costs little beyond the read itself.
    """
    path = Path(path)
    with _open(path) as f, _Checksum() as checksum:  # header and payload from one open file, whatever replaces it
        header, start, size = _read_header(f, path)
        meta = header.get("__metadata__", {})
        buf = torch.empty(size - start, dtype=torch.uint8)  # uninitialised: the read fills it
        view = memoryview(buf.numpy())
        pos = 0
        while pos < len(buf):
            n = f.readinto(view[pos:pos + _CHUNK])
            if not n:
                raise CacheFileError(f"{path} is truncated: read {pos} of {len(buf)} payload bytes")
            if verify:
                checksum.feed(view[pos:pos + n])
            pos += n
        crc = checksum.value() if verify else None
    if verify:
        expected = meta.get(CHECKSUM_KEY)
        if expected is None:
            raise CacheFileError(f"{path} has no payload checksum ({CHECKSUM_KEY}); it was not written by portable")
        if f"{crc:08x}" != expected:
            raise CacheFileError(f"{path} is corrupt: payload checksum {crc:08x} does not match the recorded "
                                 f"{expected} (the file was modified or damaged after it was written)")
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        s, e = entry["data_offsets"]
        dtype = CODE_DTYPES[entry["dtype"]]
        raw = buf[s:e]
        if s % dtype.itemsize:  # written by another tool without alignment: copy instead of viewing in place
            raw = raw.clone()
        tensors[name] = raw.view(dtype).reshape(entry["shape"])
    return tensors, meta
