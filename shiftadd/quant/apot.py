"""Additive powers-of-two (APoT) rounding of scale factors.

A scale ``a`` becomes ``s1*2^e1 + s2*2^e2 + ...`` (``terms`` signed powers of two), rounded greedily in
the log domain as method.md §1 prescribes: ``e = round(log2|r|)`` on the running residual ``r``.
The signs are kept: dropping the negative terms is the bug the authors' kernel loader has.
With ``terms == 1`` the multiply by the scale is one shift.
"""

from __future__ import annotations

import torch

# Residuals below this fraction of the original scale are not worth another term (and log2(0) = -inf).
_REL_EPS = 2.0**-24
# Terms span at most this many binary orders below the leading one and stay >= 2^MIN_EXP, so every
# APoT value is exact in float16 (11 significant bits, subnormals down to 2^-24): scales are stored
# as float16. A dropped term is < 2^-10 of the scale.
SPAN = 10
MIN_EXP = -24


SCALE_FORMATS = ("fp16", "e5m2")


def e5m2_round(a: torch.Tensor) -> torch.Tensor:
    """Nearest float8 e5m2 value (round half to even): ``±2^e (1 + m/4)``, i.e. at most three powers
    of two within two binary orders (an APoT value: ≤ 3 shifts and adds), stored in ONE byte, and
    exactly the high byte of its float16 pattern (same exponent bias), so decoding is a byte shift."""
    return a.to(torch.float32).clamp(-57344.0, 57344.0).to(torch.float8_e5m2).to(torch.float32)


def scale_rounder(fmt: str, terms: int):
    """The rounding every scale and offset of a fit goes through, for storage format ``fmt``:
    'fp16' = APoT with ``terms`` terms within SPAN orders (2 bytes), 'e5m2' = :func:`e5m2_round` (1 byte)."""
    if fmt == "fp16":
        return lambda a: apot_round(a, terms)
    if fmt == "e5m2":
        return e5m2_round
    raise ValueError(f"scale format must be one of {SCALE_FORMATS}, got {fmt!r}")


def apot_round(a: torch.Tensor, terms: int) -> torch.Tensor:
    """Round every element of ``a`` to the nearest sum of ``terms`` signed powers of two (greedy)."""
    if terms < 1:
        raise ValueError(f"apot terms must be >= 1, got {terms}")
    signs, exps = apot_decompose(a, terms)
    return (signs.to(torch.float64) * torch.exp2(exps.to(torch.float64))).sum(-1)


def apot_decompose(a: torch.Tensor, terms: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Signs (-1/0/+1, int8) and exponents (int16) of the APoT terms of ``a``: shape ``a.shape + (terms,)``.

    ``sum(sign * 2**exp)`` over the last axis reproduces ``apot_round(a, terms)`` exactly; a zero sign
    marks an unused term.
    """
    if terms < 1:
        raise ValueError(f"apot terms must be >= 1, got {terms}")
    a = a.to(torch.float64)
    r = a.clone()
    floor = a.abs() * _REL_EPS
    signs, exps = [], []
    lead = None
    for _ in range(terms):
        live = r.abs() > floor
        mag = torch.where(live, r.abs(), torch.ones_like(r))
        e = torch.round(torch.log2(mag))
        if lead is None:
            lead = e
        live &= (e >= lead - SPAN) & (e >= MIN_EXP)
        s = torch.where(live, torch.sign(r), torch.zeros_like(r))
        r -= s * torch.exp2(e)
        signs.append(s.to(torch.int8))
        exps.append(torch.where(live, e, torch.zeros_like(e)).to(torch.int16))
    return torch.stack(signs, -1), torch.stack(exps, -1)
