"""The scoreboard's methods. A new method registers itself here with one ``register`` call:
a name, a factory that builds its compressor, and the suites it runs in."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from llmdeploy.compress import Compressor
from llmdeploy.quant import RTN, DynamicInt8


@dataclass(frozen=True)
class Method:
    name: str
    build: Callable[[], Compressor | None]  # None: the dense baseline
    suites: tuple[str, ...] = ("quick", "full")
    note: str = ""


METHODS: dict[str, Method] = {}


def register(name: str, build: Callable[[], Compressor | None], suites=("quick", "full"), note: str = "") -> None:
    if name in METHODS:
        raise ValueError(f"benchmark method {name!r} registered twice")
    METHODS[name] = Method(name, build, tuple(suites), note)


def for_suite(suite: str) -> list[Method]:
    return [m for m in METHODS.values() if suite in m.suites]


# SmolLM2-135M's hidden size is 576 = 4.5 x 128: groups of 64 divide every width.
G = 64
register("dense", lambda: None, note="fp32 weights dequantized from the GGUF (Q4_1 grid)")
register("rtn-w8-g64", lambda: RTN(bits=8, group_size=G))
register("rtn-w4-g64", lambda: RTN(bits=4, group_size=G))
register("rtn-w3-g64", lambda: RTN(bits=3, group_size=G))
register("rtn-w2-g64", lambda: RTN(bits=2, group_size=G), suites=("full",),
         note="uncalibrated 2-bit collapses")
register("rtn-w4-g64-sym", lambda: RTN(bits=4, group_size=G, symmetric=True), suites=("full",))
register("mixed-w4-down8", lambda: RTN(bits=4, group_size=G, overrides={"down_proj": 8}),
         note="4-bit, MLP down projections 8-bit")
register("w8a8-dynamic", lambda: DynamicInt8())
