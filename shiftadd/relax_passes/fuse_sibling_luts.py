"""One LUT kernel call for sibling matmuls: Q/K/V, and gate/up, read the same activation.

Why: each AVX2 LUT call builds its int8 tables from the activation and launches its tasks on the
thread pool; at decode (M = 1) on narrow layers that fixed cost is a large part of each call
(docs/ENGINEERING.md). Calls of the same kernel family (same K, bits, group, offsets, scale format
and tying) on the same activation become one call over their rows stacked, since the packed layout
keeps 32-row blocks outermost (schedules/lut_avx2.py ``pack_avx2``): the stacked arrays are the
members' arrays concatenated on axis 0, and each member's output is a column slice of the stacked
output. Same codes, same scales, same sums per row: the outputs are bit-identical to the separate
calls. Members whose row count is not a multiple of 32 (padded blocks) or that share scales across
rows are left alone.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import tvm
from tvm import relax

from ..schedules import lut_avx2
from ..schedules.backends import AVX2Backend
from ..schedules.lut_spec import LUTSpec
from .ir import drop_unused_params


def _source(x, bound):
    """The activation a LUT input comes from: the rewrite flattens it per matmul (its own reshape
    to [M, K] each time), so siblings read equal reshapes of one variable."""
    v = bound.get(x)
    if (
        isinstance(v, relax.Call)
        and isinstance(v.op, tvm.ir.Op)
        and v.op.name == "relax.reshape"
        and isinstance(v.args[0], relax.Var)
    ):
        return v.args[0]
    return x


def _member(value, params, bound):
    """(family key, n, (codes, alpha, offset) vars, input) for a fusable AVX2 LUT call_tir, else None."""
    if not (isinstance(value, relax.Call) and isinstance(value.op, tvm.ir.Op) and value.op.name == "relax.call_tir"):
        return None
    gv, args = value.args[0], value.args[1]
    spec = LUTSpec.parse(gv.name_hint) if isinstance(gv, tvm.ir.GlobalVar) else None
    if spec is None or spec.rows != 1 or not isinstance(args, relax.Tuple) or len(args.fields) != 4:
        return None
    x, *packed = args.fields
    n = spec.n
    if (
        n % lut_avx2.ROWS
        or not isinstance(x, relax.Var)
        or any(not isinstance(v, relax.Var) or v.name not in params for v in packed)
    ):
        return None
    return (_source(x, bound), spec._replace(n=0)), n, tuple(packed), x


@relax.expr_functor.mutator
class _Fuser(relax.PyExprMutator):
    def __init__(self, mod, groups, specs, params, knobs, kernels):
        super().__init__(mod)
        self.groups = groups  # binding var of a member -> (group id, column offset, n)
        self.params = params
        self.knobs = knobs
        self.kernels = kernels
        self.emitted = {}  # group id -> stacked output var
        self.specs = specs  # group id -> (key, members)
        self.new_params: list[tuple[relax.Var, np.ndarray]] = []

    def visit_var_binding_(self, binding):
        g = self.groups.get(binding.var)
        if g is None:
            return super().visit_var_binding_(binding)
        gid, off, n = g
        if gid not in self.emitted:
            self.emitted[gid] = self._stacked(gid, binding.value)
        y = self.emitted[gid]
        sl = relax.op.strided_slice(y, axes=[1], begin=[off], end=[off + n])
        emit = self.builder_.emit if isinstance(binding.var, relax.DataflowVar) else self.builder_.emit_output
        self.set_var_remap(binding.var, emit(sl, name_hint=binding.var.name))

    def _stacked(self, gid, value):
        key, members = self.specs[gid]
        spec = key[1]
        x = members[0][3]  # the first member's flattened input: defined before any member
        n_total = sum(n for _, n, _, _ in members)
        arrays = [np.concatenate([self.params[p[i].name] for _, _, p, _ in members], axis=0) for i in range(2)]
        zoff = (
            np.concatenate([self.params[p[2].name] for _, _, p, _ in members], axis=0)
            if spec.offset
            else self.params[members[0][2][2].name]
        )
        label = (
            "fused("
            + ",".join(
                p[0].name[: -len(".codes")] if p[0].name.endswith(".codes") else p[0].name for _, _, p, _ in members
            )
            + ")"
        )
        vs = []
        for suffix, a in zip((".codes", ".alpha", ".offset"), (*arrays, zoff)):
            v = relax.Var(label + suffix, relax.TensorType(a.shape, str(a.dtype)))
            self.new_params.append((v, a))
            vs.append(v)
        stacked = spec._replace(n=n_total)
        name = stacked.name()
        if name not in self.kernels:
            f = AVX2Backend().primfunc(stacked, self.knobs(*stacked) if self.knobs else None)
            self.kernels[name] = self.builder_.add_func(f.with_attr("global_symbol", name), name)
        xv = self.visit_expr(x)
        m_expr = value.ty.shape.values[0]
        call = relax.call_tir(self.kernels[name], [xv, *vs], relax.TensorType([m_expr, n_total], "float32"))
        return self.builder_.emit(call, name_hint="lut_stacked")


def fuse_sibling_luts(mod: tvm.IRModule, params: dict[str, np.ndarray], functions=("main",), knobs=None):
    """Stack sibling AVX2 LUT calls in ``functions`` of ``mod``. ``params`` maps weight parameter
    names to values; ``knobs(k, n, bits, group, offset, rows, fp8, tied)`` gives a stacked kernel's (decode,
    batch) knobs (the tuning database, as for the rewrite). Returns (module, params of the new
    signatures, number of calls removed)."""
    kernels = {gv.name_hint: gv for gv, _ in mod.functions_items()}
    removed, out_params = 0, {}
    for fname in functions:
        func = mod[fname]
        found, bound = defaultdict(list), {}
        for block in func.body.blocks:
            for b in block.bindings:
                if not isinstance(b, relax.VarBinding):
                    continue
                bound[b.var] = b.value
                m = _member(b.value, params, bound)
                if m is not None:
                    found[m[0]].append((b.var, m[1], m[2], m[3]))
        groups, specs = {}, {}
        for key, members in found.items():
            if len(members) < 2:
                continue
            gid = len(specs)
            specs[gid] = (key, members)
            off = 0
            for var, n, _, _ in members:
                groups[var] = (gid, off, n)
                off += n
            removed += len(members) - 1
        if not specs:
            out_params.update({v.name: params[v.name] for v in func.params[int(func.attrs["num_input"]) :]})
            continue
        fz = _Fuser(mod, groups, specs, params, knobs, kernels)
        new = fz.visit_expr(func)
        new = relax.Function(
            list(new.params) + [v for v, _ in fz.new_params], new.body, new.ret_ty, new.is_pure, new.attrs
        )
        fz.builder_.update_func(fz.builder_.get().get_global_var(fname), new)
        mod = fz.builder_.get()
        values = {**params, **{v.name: a for v, a in fz.new_params}}
        mod, kept = drop_unused_params(mod, fname, values)
        for name, a in kept.items():
            if name in out_params and not np.array_equal(out_params[name], a):
                raise AssertionError(f"fuse_sibling_luts: '{fname}' stacked '{name}' differently")
            out_params[name] = a
        kernels = {gv.name_hint: gv for gv, _ in mod.functions_items()}
    if removed:  # the members' own kernels, if nothing else calls them
        mod = relax.transform.DeadCodeElimination(
            [gv.name_hint for gv, f in mod.functions_items() if isinstance(f, relax.Function)]
        )(mod)
    return mod, out_params, removed
