"""C kernels compiled on first use with the system's C compiler and loaded through ``ctypes``.

Each source under ``kernels/csrc/`` is built once per machine (``-O3 -march=native -fopenmp``)
into ``$LLMDEPLOY_CACHE`` (default ``~/.cache/llmdeploy``)/``kernels/``, named by a hash of the
source, the flags and the CPU, so a changed source or another machine rebuilds. Without a
compiler, or when the build fails, :func:`library` returns None and callers fall back to their
numba or torch path (logged once). ``LLMDEPLOY_NATIVE=0`` disables these kernels.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]


def cache_dir() -> Path:
    root = os.environ.get("LLMDEPLOY_CACHE") or Path.home() / ".cache" / "llmdeploy"
    return Path(root) / "kernels"


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + platform.processor() + flags


@functools.cache
def library(name: str) -> ctypes.CDLL | None:
    """The compiled ``csrc/<name>.c`` (cached), or None when it cannot be built here."""
    if os.environ.get("LLMDEPLOY_NATIVE", "1") == "0":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.info("no C compiler: the %s native kernel is off (numba/torch paths instead)", name)
        return None
    src = CSRC / f"{name}.c"
    key = hashlib.sha256(src.read_bytes() + " ".join([cc, *FLAGS]).encode() + _cpu_id().encode()).hexdigest()[:16]
    target = cache_dir() / f"{name}-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            subprocess.run([cc, *FLAGS, str(src), "-o", tmp], check=True, capture_output=True, timeout=120)
            os.replace(tmp, target)  # atomic: concurrent builders never load a half-written file
        except (OSError, subprocess.SubprocessError) as e:
            err = getattr(e, "stderr", b"") or b""
            log.warning("building the %s native kernel failed (%s %s); using the numba/torch paths",
                        name, type(e).__name__, err.decode(errors="replace")[:300])
            Path(tmp).unlink(missing_ok=True)
            return None
    try:
        return ctypes.CDLL(str(target))
    except OSError as e:
        log.warning("loading %s failed (%s); using the numba/torch paths", target, e)
        return None


@functools.cache
def function(name: str, symbol: str, argtypes: tuple, restype) -> ctypes._CFuncPtr | None:
    """``symbol`` of the compiled ``csrc/<name>.c`` with its C signature, or None (see :func:`library`)."""
    lib = library(name)
    if lib is None:
        return None
    fn = getattr(lib, symbol)
    fn.argtypes = list(argtypes)
    fn.restype = restype
    return fn
