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


def apot_round(a: torch.Tensor, terms: int) -> torch.Tensor:
    """Round every element of ``a`` to the nearest sum of ``terms`` signed powers of two (greedy)."""
    if terms < 1:
        raise ValueError(f"apot terms must be >= 1, got {terms}")
    a = a.to(torch.float64)
    out = torch.zeros_like(a)
    r = a.clone()
    floor = a.abs() * _REL_EPS
    for _ in range(terms):
        live = r.abs() > floor
        mag = torch.where(live, r.abs(), torch.ones_like(r))
        term = torch.sign(r) * torch.exp2(torch.round(torch.log2(mag)))
        term = torch.where(live, term, torch.zeros_like(r))
        out += term
        r -= term
    return out


def apot_decompose(a: torch.Tensor, terms: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Signs (-1/0/+1, int8) and exponents (int16) of the APoT terms of ``a``: shape ``a.shape + (terms,)``.

    ``sum(sign * 2**exp)`` over the last axis reproduces ``apot_round(a, terms)`` exactly; a zero sign
    marks an unused term.
    """
    a = a.to(torch.float64)
    r = a.clone()
    floor = a.abs() * _REL_EPS
    signs, exps = [], []
    for _ in range(terms):
        live = r.abs() > floor
        mag = torch.where(live, r.abs(), torch.ones_like(r))
        e = torch.round(torch.log2(mag))
        s = torch.where(live, torch.sign(r), torch.zeros_like(r))
        r -= s * torch.exp2(e)
        signs.append(s.to(torch.int8))
        exps.append(torch.where(live, e, torch.zeros_like(e)).to(torch.int16))
    return torch.stack(signs, -1), torch.stack(exps, -1)
