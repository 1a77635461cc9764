"""The LUT-add matmul as a TensorIR kernel (method.md §5, row-wise groups, float tables).

``y[m, n] = Σ_b Σ_g α[b, g, n] · Σ_{t ∈ g} T[m, t, code_b[n, t]]`` where ``T[m, t, p]`` is the
sum of the 4 activations ``x[m, 4t:4t+4]`` with signs from the bits of ``p`` (bit set = +x). The
tables are built once per activation row and shared by all planes and output rows; the look-ups
of a group are summed first and scaled once (one scale per row, plane and group).

Packed layout (made by :func:`shiftadd.quant.pack.pack_bcq`):
  codes int32 [q, T8, Np]  nibble ``t % 8`` of ``codes[b, t // 8, n]`` is ``code_b[n, t]``
  alpha f16   [q, NG, Np]  APoT scale of plane b, group g, row n (exact in float16, read as float32)
  zoff  f16   [NG, Np]     offset z of group g, row n (a [1, Np] dummy when built without offset)
``Np`` is N rounded up to the vector width; padded rows have α = 0. ``T4p = NG·G/4`` tables cover K
rounded up to whole groups; inputs past K read as 0, so padded tables contribute nothing.
"""

from __future__ import annotations

import tvm
from tvm.script import tirx as T

MU = 4
NIBBLES = 8  # codes per int32 word
DEFAULT_VEC = 16


def lut_dims(k: int, n: int, group: int, vec: int = DEFAULT_VEC) -> dict:
    """Derived sizes of the packed layout for a [K -> N] matmul with effective group ``group``."""
    if group % MU:
        raise ValueError(f"group {group} is not a multiple of {MU}")
    t4 = -(-k // MU)
    g4 = group // MU
    ng = -(-t4 // g4)
    t4p = ng * g4
    return {"t4p": t4p, "t8": -(-t4p // NIBBLES), "g4": g4, "ng": ng, "np": -(-n // vec) * vec}


def make_lut_matmul(
    k: int, n: int, bits: int, group: int, vec: int = DEFAULT_VEC, offset: bool = True, alpha_rows: int = 1
) -> tvm.tirx.PrimFunc:
    """The kernel for x[M, k] -> y[M, n] (M symbolic), written directly in its CPU loop nest.

    Stage 1 builds the tables in parallel over (row, table), 16 entries as one vector; with
    ``offset`` it also sums each group's activations (the all-plus entry 15 of its tables).
    Stage 2 runs in parallel over tiles of ``vec`` output rows: per activation row, plane and group
    it sums the look-ups of the group in a ``vec``-wide register accumulator, then adds
    ``alpha *`` that sum (and ``z * group sum`` for the offset). ``alpha_rows`` consecutive rows share
    one scale and offset (the block layout: alpha is [q, NG, ceil(Np / alpha_rows)]).
    (Written as loops rather than via ``s_tir.Schedule.compute_at``, which rejects every
    producer/consumer pair in TVM 0.27.0.post1 with "is an output block".)
    """
    d = lut_dims(k, n, group, vec)
    t4p, t8, g4, ng, npad = d["t4p"], d["t8"], d["g4"], d["ng"], d["np"]
    q = bits
    tiles = npad // vec
    use_z = 1 if offset else 0
    ar = int(alpha_rows)
    na = -(-npad // ar)

    def signed(X, it, p, j):
        """Entry ``p`` of table ``it`` (int64): the term of its activation ``j``, +x where bit ``j`` of ``p``
        is set, else -x, and 0 past K. Called inside the prim_func; T.LT as the parser writes ``<``
        (Python's ``<`` would fold a constant column, with one table, earlier than the parser does)."""
        col = it % t4p * 4 + j if j else it % t4p * 4
        bit = p // (1 << j) % 2 if j else p % 2
        return T.if_then_else(
            T.LT(col, T.int64(k)), T.Select(bit == 1, X[it // t4p, col], T.float32(0) - X[it // t4p, col]), T.float32(0)
        )

    @T.prim_func
    def lut_matmul(
        x_h: T.handle,
        codes: T.Buffer((q, t8, npad), "int32"),
        alpha: T.Buffer((q, ng, na), "float16"),
        zoff: T.Buffer((ng * use_z + 1 - use_z, na), "float16"),
        y_h: T.handle,
    ):
        T.func_attr({"tir.noalias": True})
        m_dim = T.int64()
        X = T.match_buffer(x_h, (m_dim, k), "float32")
        Y = T.match_buffer(y_h, (m_dim, n), "float32")
        lut = T.decl_buffer((m_dim * t4p * 16,), "float32")
        gs = T.decl_buffer((m_dim * ng,), "float32")
        for it in T.parallel(m_dim * t4p):
            for p in T.vectorized(16):
                lut[it * 16 + p] = signed(X, it, p, 0) + signed(X, it, p, 1) + signed(X, it, p, 2) + signed(X, it, p, 3)
        if use_z == 1:
            for ig in T.parallel(m_dim * ng):
                gs[ig] = T.float32(0)
                for tt in range(g4):
                    gs[ig] = gs[ig] + lut[((ig // ng) * t4p + ig % ng * g4 + tt) * 16 + 15]
        for jo in T.parallel(tiles):
            acc = T.decl_buffer((vec,), "float32", scope="local")
            part = T.decl_buffer((vec,), "float32", scope="local")
            for i in range(m_dim):
                for ji in T.vectorized(vec):
                    acc[ji] = T.float32(0)
                if use_z == 1:
                    for g in range(ng):
                        for ji in T.vectorized(vec):
                            acc[ji] = acc[ji] + T.Cast("float32", zoff[g, (jo * vec + ji) // ar]) * gs[i * ng + g]
                for b, g in T.grid(q, ng):
                    for ji in T.vectorized(vec):
                        part[ji] = T.float32(0)
                    for tt in range(g4):
                        for ji in T.vectorized(vec):
                            part[ji] = (
                                part[ji]
                                + lut[
                                    (i * t4p + g * g4 + tt) * 16
                                    + T.bitwise_and(
                                        T.shift_right(
                                            codes[b, (g * g4 + tt) // 8, jo * vec + ji], (g * g4 + tt) % 8 * 4
                                        ),
                                        15,
                                    )
                                ]
                            )
                    for ji in T.vectorized(vec):
                        acc[ji] = acc[ji] + T.Cast("float32", alpha[b, g, (jo * vec + ji) // ar]) * part[ji]
                for ji in range(vec):
                    if jo * vec + ji < n:
                        Y[i, jo * vec + ji] = acc[ji]

    return lut_matmul


def build_lut_kernel(
    k: int, n: int, bits: int, group: int, vec: int = DEFAULT_VEC, offset: bool = True, alpha_rows: int = 1
) -> tvm.tirx.PrimFunc:
    """Scheduled kernel, tagged opaque (op_pattern 8) so Relax fusion leaves it alone."""
    f = make_lut_matmul(k, n, bits, group, vec, offset, alpha_rows)
    return f.with_attr({"op_pattern": 8, "tirx.is_scheduled": True})
