"""Bit packing of integer codes into bytes, for any width from 1 to 8 bits.

Layout: along the last dimension, every 8 consecutive codes form one little-endian word of
``8·bits`` bits (code ``i`` at bits ``[i·bits, (i+1)·bits)``), stored as ``bits`` bytes. For
widths dividing 8 this is the familiar layout (e.g. 4-bit: low nibble first), and a faster
byte-wise path computes the same bytes.
"""

from __future__ import annotations

import torch


def _check(bits: int, n: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if n % 8:
        raise ValueError(f"the packed dimension must be a multiple of 8, got {n}")


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned codes (values in ``[0, 2**bits)``) along the last dim into uint8."""
    _check(bits, codes.shape[-1])
    lead = codes.shape[:-1]
    if bits == 8:
        return codes.to(torch.uint8).contiguous()
    if 8 % bits == 0:
        per = 8 // bits
        c = codes.to(torch.uint8).reshape(*lead, -1, per)
        out = torch.zeros(c.shape[:-1], dtype=torch.uint8, device=codes.device)
        for t in range(per):
            out |= c[..., t] << (t * bits)
        return out.reshape(*lead, -1)
    c = codes.to(torch.int64).reshape(*lead, -1, 8)
    shifts = torch.arange(8, device=codes.device, dtype=torch.int64) * bits
    word = (c << shifts).sum(-1)  # disjoint bit fields, at most 56 bits: no overflow
    byte_shifts = torch.arange(bits, device=codes.device, dtype=torch.int64) * 8
    out = (word.unsqueeze(-1) >> byte_shifts) & 0xFF
    return out.to(torch.uint8).reshape(*lead, -1)


def unpack(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack`: uint8 codes of length ``n`` along the last dim."""
    _check(bits, n)
    lead = packed.shape[:-1]
    if bits == 8:
        return packed
    mask = (1 << bits) - 1
    if 8 % bits == 0:
        per = 8 // bits
        parts = [(packed >> (t * bits)) & mask for t in range(per)]
        return torch.stack(parts, dim=-1).reshape(*lead, n)
    b = packed.to(torch.int64).reshape(*lead, -1, bits)
    byte_shifts = torch.arange(bits, device=packed.device, dtype=torch.int64) * 8
    word = (b << byte_shifts).sum(-1)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int64) * bits
    codes = (word.unsqueeze(-1) >> shifts) & mask
    return codes.to(torch.uint8).reshape(*lead, n)
