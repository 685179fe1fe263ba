"""C kernels compiled on first use with the system's C compiler and loaded through ``ctypes``.

Each source under ``kernels/csrc/`` is built once per machine (``-O3 -march=native -fopenmp``)
into ``$LLMDEPLOY_CACHE`` (default ``~/.cache/llmdeploy``)/``kernels/``, named by a hash of the
source, the flags and the CPU, so a changed source or another machine rebuilds. Without a
compiler, or when the build fails, :func:`library` returns None and callers fall back to their
numba or torch path (logged once). ``LLMDEPLOY_NATIVE=0`` disables these kernels.

The kernels have AVX-512, AVX2+FMA and portable C paths, chosen by the compiler from the build's
instruction set. :func:`isa` (or ``LLMDEPLOY_NATIVE_ISA``, read at import) builds them for a
narrower one than this CPU's: ``"avx2"`` (no AVX-512) or ``"portable"`` (no AVX), so that every
path is tested on one machine (:func:`available_isas`).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
#: extra flags per instruction-set variant (``-march=native`` narrowed)
ISA_FLAGS = {"native": [], "avx2": ["-mno-avx512f"],
             "portable": ["-mno-avx512f", "-mno-avx2", "-mno-fma", "-mno-f16c", "-mno-avx"]}
_ISA = os.environ.get("LLMDEPLOY_NATIVE_ISA", "native")


@contextlib.contextmanager
def isa(name: str) -> Iterator[None]:
    """Kernels resolved inside this block are built for instruction set ``name`` (see :data:`ISA_FLAGS`)."""
    global _ISA
    if name not in ISA_FLAGS:
        raise ValueError(f"unknown instruction set {name!r}; choose one of {sorted(ISA_FLAGS)}")
    old, _ISA = _ISA, name
    try:
        yield
    finally:
        _ISA = old


def current_isa() -> str:
    """The instruction-set variant kernels are built for now (``"native"`` unless :func:`isa` says otherwise)."""
    return _ISA


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return set()


def available_isas() -> list[str]:
    """The variants that run here and differ from each other: always ``"native"``; ``"avx2"`` on an
    AVX-512 CPU; ``"portable"`` on any x86 CPU with AVX."""
    flags = _cpu_flags()
    out = ["native"]
    if "avx512f" in flags and "avx2" in flags and "fma" in flags:
        out.append("avx2")
    if "avx" in flags and platform.machine() in ("x86_64", "AMD64"):
        out.append("portable")
    return out


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


def library(name: str) -> ctypes.CDLL | None:
    """The compiled ``csrc/<name>.c`` for the current :func:`isa` (cached), or None when it cannot be built here."""
    return _library(name, _ISA)


def _cache_clear() -> None:
    """Forget every built library and resolved function (the next use rebuilds or reloads)."""
    _library.cache_clear()
    _function.cache_clear()


library.cache_clear = _cache_clear  # type: ignore[attr-defined]


@functools.cache
def _library(name: str, isa_name: str) -> ctypes.CDLL | None:
    if isa_name not in ISA_FLAGS:
        from ..errors import ConfigError
        raise ConfigError(f"LLMDEPLOY_NATIVE_ISA={isa_name!r} is not an instruction-set variant; "
                          f"use one of {sorted(ISA_FLAGS)} (or unset it)")
    if os.environ.get("LLMDEPLOY_NATIVE", "1") == "0":
        return None
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        log.info("no C compiler: the %s native kernel is off (numba/torch paths instead)", name)
        return None
    src = CSRC / f"{name}.c"
    flags = [*FLAGS, *ISA_FLAGS[isa_name]]
    sources = src.read_bytes() + b"".join(h.read_bytes() for h in sorted(CSRC.glob("*.h")))  # headers too
    key = hashlib.sha256(sources + " ".join([cc, *flags]).encode() + _cpu_id().encode()).hexdigest()[:16]
    target = cache_dir() / f"{name}-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            subprocess.run([cc, *flags, str(src), "-o", tmp], check=True, capture_output=True, timeout=120)
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


def function(name: str, symbol: str, argtypes: tuple, restype) -> ctypes._CFuncPtr | None:
    """``symbol`` of the compiled ``csrc/<name>.c`` with its C signature, or None (see :func:`library`)."""
    return _function(name, symbol, argtypes, restype, _ISA)


@functools.cache
def _function(name: str, symbol: str, argtypes: tuple, restype, isa_name: str) -> ctypes._CFuncPtr | None:
    lib = _library(name, isa_name)
    if lib is None:
        return None
    fn = getattr(lib, symbol)
    fn.argtypes = list(argtypes)
    fn.restype = restype
    return fn
