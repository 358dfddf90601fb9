"""The disk's side of benchmarks/cache_io.py: dropping one file from the page cache (and checking it left), the
disk's own sequential write and read speed, and which filesystem a folder is on. No project imports: plain files."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import time
from pathlib import Path


# ---------------------------------------------------------------- page cache


class PageCache:
    """Drops one file from the page cache and says how.

    `posix_fadvise(DONTNEED)` after an fsync evicts just that file; mincore then says how much of it is still
    resident. Writing /proc/sys/vm/drop_caches (root, where the machine permits it) is tried once at the start, to
    say whether it is possible, and used afterwards only when the file is still resident: it evicts every file,
    this process's own libraries included, whose code then pages back in inside the timed region (hundreds of ms of
    libtorch on the first decode step after it).
    """

    def __init__(self, use_drop_caches: bool = True):
        self.fadvise = "not tried"
        self.drop_caches = "not used (--no-drop-caches)"
        self.drop_caches_used = 0
        self.resident_before_cold: list[float] = []
        if use_drop_caches:
            self.drop_caches = "permitted" if self._drop_all() else self.drop_caches

    def _drop_all(self) -> bool:
        try:
            with open("/proc/sys/vm/drop_caches", "w") as f:
                f.write("1\n")
            return True
        except OSError as e:
            self.drop_caches = f"not permitted ({e.strerror or e})"
            return False

    def drop(self, path: Path) -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)  # dirty pages cannot be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            self.fadvise = "ok"
        except (AttributeError, OSError) as e:
            self.fadvise = f"failed ({e})"
        finally:
            os.close(fd)
        fraction = resident_fraction(path)
        if (fraction is None or fraction > 0.01) and self.drop_caches == "permitted" and self._drop_all():
            self.drop_caches_used += 1
            fraction = resident_fraction(path)
        if fraction is not None:
            self.resident_before_cold.append(fraction)

    def describe(self) -> str:
        used = (f", used {self.drop_caches_used} times where fadvise left pages resident" if self.drop_caches_used
                else ", not needed" if self.drop_caches == "permitted" else "")
        resident = (f"; resident before a cold read: at most {max(self.resident_before_cold):.0%} of the file (mincore)"
                    if self.resident_before_cold else "; residency not measurable (no mincore)")
        return f"posix_fadvise(DONTNEED) per file: {self.fadvise}; /proc/sys/vm/drop_caches: {self.drop_caches}" \
               f"{used}{resident}"


def resident_fraction(path: Path) -> float | None:
    """The fraction of `path`'s pages in the page cache (mincore over a read-only mapping), or None if unknown."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        size = path.stat().st_size
        if size == 0:
            return 0.0
        fd = os.open(path, os.O_RDONLY)
        try:
            addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if addr in (None, ctypes.c_void_p(-1).value):
                return None
            try:
                pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
                vec = (ctypes.c_ubyte * pages)()
                if libc.mincore(addr, size, vec) != 0:
                    return None
                return sum(b & 1 for b in vec) / pages
            finally:
                libc.munmap(addr, size)
        finally:
            os.close(fd)
    except (OSError, AttributeError, TypeError):
        return None


# ---------------------------------------------------------------- disk


def disk_write(path: Path, data: memoryview, block: int) -> float:
    """Seconds to write `data` to a new file in `block`-byte writes, fsync included."""
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for pos in range(0, len(data), block):
            view = data[pos:pos + block]
            while view:
                view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - start


def disk_read(path: Path, buffer: memoryview) -> float:
    """Seconds to read all of `path` sequentially into one reused buffer."""
    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        while os.readv(fd, [buffer]):
            pass
    finally:
        os.close(fd)
    return time.perf_counter() - start


def filesystem(folder: Path) -> str:
    """'ext4 on /dev/vda (mounted at /)' for the mount holding `folder`."""
    folder = folder.resolve()
    best = None
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            device, mount, fstype = line.split()[:3]
            mount = mount.replace("\\040", " ")
            if (folder == Path(mount) or Path(mount) in folder.parents) and (best is None or len(mount) > len(best[1])):
                best = (device, mount, fstype)
    except OSError:
        return "unknown"
    return f"{best[2]} on {best[0]} (mounted at {best[1]})" if best else "unknown"
