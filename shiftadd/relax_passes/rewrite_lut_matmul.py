"""Relax pass: every matmul by a constant weight becomes a call_tir of the shift/LUT-add kernel.

Pattern: ``R.matmul(x, W)`` where ``W`` is a weight parameter (a function param after
``num_input`` whose value is known) or a constant, either directly (ONNX ``MatMul``: W is [K, N])
or through ``R.permute_dims(W, [1, 0])`` (ONNX ``Gemm`` with transB: W is [N, K]).
Rewrite: ``x`` is flattened to [M, K], the kernel is called on the packed BCQ planes and APoT
scales (new weight parameters ``<name>.codes`` / ``<name>.alpha``), and the result is reshaped
back. The replaced weight parameter is dropped if nothing else uses it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
from dataclasses import dataclass, field

import numpy as np
import tvm
from tvm import relax
from tvm.ir import GenericConst

from ..quant import BCQConfig
from ..quant.gptq import ColumnBCQWeight, fit_layer
from ..quant.pack import column_as_one_bit
from ..schedules.backends import KERNELS, backend_for
from ..schedules.lut_kernel import DEFAULT_VEC
from ..schedules.lut_spec import LUTSpec
from .ir import drop_unused_params, is_op, match_weight_operand, resolve_binding, shape_of

logger = logging.getLogger(__name__)


@dataclass
class LayerReport:
    name: str
    k: int
    n: int
    status: str  # "rewritten" | "kept"
    reason: str = ""
    bits: int = 0
    group: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    rel_error: float = float("nan")
    transposed: bool = False  # the stored weight is [N, K] (Gemm transB) rather than [K, N]
    calibrated: bool = False  # fitted with error feedback against calibration inputs
    layout: str = ""  # scale layout of the fit (row-group | block | column)
    kernel: str = ""  # "avx2" (int8 tables, C micro-kernel) | "f32" (float tables, TIR)


@dataclass
class RewriteReport:
    layers: list[LayerReport] = field(default_factory=list)
    dequantized: dict[str, np.ndarray] = field(default_factory=dict)  # name -> weight as stored
    allocation: object | None = None  # calibration.plan.Allocation when bits were allocated per layer

    @property
    def rewritten(self) -> list[LayerReport]:
        return [r for r in self.layers if r.status == "rewritten"]

    @property
    def kept(self) -> list[LayerReport]:
        return [r for r in self.layers if r.status != "rewritten"]

    def weight_bytes(self) -> tuple[int, int]:
        """(bytes of the matmul weights before, after) over all matmuls seen (kept ones count as is)."""
        before = sum(r.bytes_before for r in self.layers)
        after = sum(r.bytes_after if r.status == "rewritten" else r.bytes_before for r in self.layers)
        return before, after

    def average_bits(self) -> float:
        """Stored bits per weight over the rewritten matmuls, codes, scales and offsets included."""
        n = sum(r.k * r.n for r in self.rewritten)
        return 8 * sum(r.bytes_after for r in self.rewritten) / max(n, 1)

    def table(self) -> str:
        lines = [
            "| layer | K | N | status | bits | group | rel. weight error | bytes before | bytes after |",
            "|---|---:|---:|---|---:|---:|---:|---:|---:|",
        ]
        for r in self.layers:
            st = r.status if r.status == "rewritten" else f"kept ({r.reason})"
            err = f"{r.rel_error:.4f}" if r.status == "rewritten" else ""
            after = r.bytes_after if r.status == "rewritten" else r.bytes_before
            lines.append(
                f"| {r.name} | {r.k} | {r.n} | {st} | {r.bits or ''} | {r.group or ''} | {err} | "
                f"{r.bytes_before} | {after} |"
            )
        return "\n".join(lines)

    def plot(self, path) -> None:
        """Bar plot of the relative weight error per rewritten layer (PNG), beside the table."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.rewritten
        fig, ax = plt.subplots(figsize=(max(6, 0.06 * len(rows) + 2), 3.2))
        ax.bar(range(len(rows)), [r.rel_error for r in rows], width=0.8)
        ax.set_xlabel("rewritten matmul (model order)")
        ax.set_ylabel("relative weight error")
        bits = sorted({r.bits for r in rows})
        ax.set_title(f"BCQ {'/'.join(map(str, bits))}-bit: ||W - W_hat|| / ||W|| per layer")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)

    def summary(self) -> str:
        b, a = self.weight_bytes()
        return (
            f"matmuls rewritten: {len(self.rewritten)}, left alone: {len(self.kept)}"
            + "".join(f"\n  kept {r.name}: {r.reason}" for r in self.kept)
            + f"\nmatmul weight bytes: {b / 1e6:.2f} MB -> {a / 1e6:.2f} MB ({b / max(a, 1):.2f}x smaller)"
        )


@relax.expr_functor.mutator
class _LutMatmulRewriter(relax.PyExprMutator):
    def __init__(
        self,
        mod,
        func,
        params,
        cfg,
        skip,
        vec,
        keep_dequantized,
        report,
        hessians=None,
        fitted=None,
        layer_bits=None,
        kernel="f32",
        knobs=None,
        kernels=None,
        packs=None,
    ):
        super().__init__(mod)
        # weight name -> (codes, alpha, offset, relative error): the functions of one module share
        # their packed weights, so a weight is dequantized and packed once
        self.packs: dict[str, tuple] = {} if packs is None else packs
        self.kernel = kernel
        self.knobs = knobs
        self.hessians = hessians or {}
        self.fitted = fitted or {}
        self.layer_bits = layer_bits or {}
        self.func = func
        self.params = params
        self.cfg = cfg
        self.skip = [re.compile(p) for p in skip]
        self.vec = vec
        self.keep_dequantized = keep_dequantized
        self.report = report
        n_in = int(func.attrs["num_input"]) if func.attrs and "num_input" in func.attrs else len(func.params)
        self.weight_vars = {v.name: v for v in func.params[n_in:] if v.name in params}
        self.new_params: list[tuple[relax.Var, np.ndarray]] = []
        self.kernels: dict[tuple, tvm.ir.GlobalVar] = {} if kernels is None else kernels
        self.fits: dict[str, object] = {}  # weight name -> its fit, for the other functions
        self.done = 0
        self.progress = None

    # -- matching -------------------------------------------------------------------------------
    def _resolve(self, expr):
        return resolve_binding(self, expr)

    def _weight(self, expr):
        """(name, value as stored) if ``expr`` is a known weight, else None."""
        if isinstance(expr, relax.Var):
            v = self.weight_vars.get(expr.name)
            if v is not None and v.same_as(expr):
                return expr.name, self.params[expr.name]
            return None
        if isinstance(expr, GenericConst):  # named by content: the same in every function
            value = expr.value.numpy()
            return f"const_{hashlib.sha1(value.tobytes()).hexdigest()[:12]}", value
        return None

    def _match(self, call):
        """(name, W [N, K] float32, transposed) for a weight matmul, else None."""
        m = match_weight_operand(call, self._resolve)
        w = self._weight(m[0]) if m is not None else None
        if w is None or w[1].ndim != 2:
            return None
        (name, value), transposed = w, m[1]
        mat = value if transposed else value.T  # -> [N, K]
        return name, np.ascontiguousarray(mat, dtype=np.float32), transposed

    # -- rewriting ------------------------------------------------------------------------------
    def _kernel(self, backend, spec):
        """The module's global for ``spec`` on ``backend``, built once (knobs from ``self.knobs``)."""
        symbol = spec.name(backend.name)
        if symbol not in self.kernels:
            knobs = self.knobs(*spec) if self.knobs and backend.tunable else None
            f = backend.primfunc(spec, knobs)
            self.kernels[symbol] = self.builder_.add_func(f.with_attr("global_symbol", symbol), symbol)
        return self.kernels[symbol]

    def visit_call_(self, call):
        call = super().visit_call_(call)
        m = self._match(call)
        if m is None:
            return call
        name, w, transposed = m
        n, k = w.shape
        rep = LayerReport(name=name, k=k, n=n, status="kept", bytes_before=w.nbytes, transposed=transposed)
        self.report.layers.append(rep)
        x = call.args[0]
        xs = shape_of(x)
        if any(p.search(name) for p in self.skip):
            rep.reason = "skipped by pattern"
            return call
        if x.ty.dtype != "float32" or str(call.attrs.out_dtype) not in ("", "void", "None", "float32"):
            rep.reason = f"activation dtype {x.ty.dtype} (kernel is float32)"
            return call
        if xs is None or len(xs) < 1 or not isinstance(xs[-1], tvm.tirx.IntImm) or int(xs[-1]) != k:
            rep.reason = "activation shape unknown or not [..., K]"
            return call
        h = self.hessians.get(name)
        cfg = layer_config(self.cfg, self.layer_bits, name)
        bw = self.fitted.get(name)
        if bw is not None:
            if bw.signs.shape[1:] != (n, k) or bw.bits != cfg.bits:
                raise ValueError(
                    f"fitted weight for '{name}' is {bw.bits}-bit {bw.signs.shape[1:]}, "
                    f"expected {cfg.bits}-bit ({n}, {k})"
                )
            if isinstance(bw, ColumnBCQWeight) != (cfg.layout == "column"):
                raise ValueError(f"fitted weight for '{name}' is not in the '{cfg.layout}' layout")
        else:
            bw = fit_layer(w, cfg, h)
        rep.calibrated = h is not None or name in self.fitted
        self.fits[name] = bw
        deq = bw.dequantize() if self.keep_dequantized or name not in self.packs else None
        colscale = None
        if isinstance(bw, ColumnBCQWeight):  # one-bit kernel over [x⊙α_1, ..., x⊙z] (pack.column_as_one_bit)
            kern_w, colscale = column_as_one_bit(bw)
            colscale = colscale.astype(np.float16)
            if not np.array_equal(colscale.astype(np.float32), column_as_one_bit(bw)[1]):
                raise ValueError(f"'{name}': column scales are not exact in float16")
        else:
            kern_w = bw
        kk = k * (colscale.shape[0] if colscale is not None else 1)
        spec = LUTSpec(
            kk,
            n,
            kern_w.bits,
            kern_w.group,
            kern_w.offset is not None,
            kern_w.alpha_rows,
            self.cfg.scale_format == "e5m2",
            kern_w.tied,
        )
        backend = backend_for(self.kernel, spec, self.vec)
        rep.kernel = backend.name
        if name not in self.packs:
            rel = float(np.linalg.norm(deq - w) / max(np.linalg.norm(w), 1e-30))
            self.packs[name] = (*backend.pack(kern_w, spec), rel)
        codes, alpha, zoff, rep.rel_error = self.packs[name]
        rep.status, rep.bits = "rewritten", bw.bits
        rep.group = getattr(bw, "group", 0) if cfg.layout == "row-group" else 0
        rep.layout = cfg.layout
        rep.bytes_after = codes.nbytes + (
            alpha.nbytes + (zoff.nbytes if kern_w.offset is not None else 0) if colscale is None else colscale.nbytes
        )
        if self.keep_dequantized:
            self.report.dequantized[name] = deq if transposed else np.ascontiguousarray(deq.T)
        cv = relax.Var(name + ".codes", relax.TensorType(codes.shape, str(codes.dtype)))
        av = relax.Var(name + ".alpha", relax.TensorType(alpha.shape, str(alpha.dtype)))
        zv = relax.Var(name + ".offset", relax.TensorType(zoff.shape, str(zoff.dtype)))
        self.new_params += [(cv, codes), (av, alpha), (zv, zoff)]
        lead = xs[:-1]
        m_expr = lead[0] if lead else tvm.tirx.const(1, "int64")
        for d in lead[1:]:
            m_expr = m_expr * d
        x2 = x if len(xs) == 2 else self.builder_.emit(relax.op.reshape(x, relax.ShapeExpr([m_expr, k])))
        if colscale is not None:  # x [M, K] -> [M, P*K] = concat_p x ⊙ s_p (shifts: s_p are APoT)
            sv = relax.Var(name + ".colscale", relax.TensorType(colscale.shape, "float16"))
            self.new_params.append((sv, colscale))
            s32 = self.builder_.emit(relax.op.astype(sv, "float32"))
            xe = self.builder_.emit(relax.op.multiply(relax.op.expand_dims(x2, [1]), s32))
            x2 = self.builder_.emit(relax.op.reshape(xe, relax.ShapeExpr([m_expr, kk])))
        gv = self._kernel(backend, spec)
        y2 = relax.call_tir(gv, [x2, cv, av, zv], relax.TensorType([m_expr, n], "float32"))
        self.done += 1
        if self.progress is not None:
            self.progress.update(1)
            self.progress.set_postfix_str(f"{name} rel.err {rep.rel_error:.3f}", refresh=False)
        if len(xs) == 2:
            return y2
        y2 = self.builder_.emit(y2)
        return relax.op.reshape(y2, relax.ShapeExpr(lead + [n]))


def layer_config(cfg: BCQConfig, layer_bits: dict | None, name: str) -> BCQConfig:
    """``cfg`` with the bits a per-layer allocation gave ``name`` (if any)."""
    from dataclasses import replace

    b = (layer_bits or {}).get(name)
    return cfg if b is None or b == cfg.bits else replace(cfg, bits=int(b))


def weight_matmul_shapes(func, params, skip) -> list[tuple[str, int, int]]:
    """(weight name, K, N) of every weight matmul the rewrite would touch, in model order: a cheap scan
    before quantizing (group checks; the tuner's list of kernels)."""
    return [m[:3] for m in _weight_matmuls(func, params, skip)]


def sibling_groups(func, params, skip) -> list[list[str]]:
    """Names of the weight matmuls that read one activation (Q/K/V, gate/up), groups of two or more in
    model order: what relax_passes/fuse_sibling_luts.py may stack into one kernel call."""
    groups: dict = {}
    for name, _, _, x in _weight_matmuls(func, params, skip):
        groups.setdefault(x, []).append(name)
    return [g for g in groups.values() if len(g) > 1]


def _weight_matmuls(func, params, skip) -> list[tuple]:
    """(weight name, K, N, activation variable) of every weight matmul the rewrite would touch."""
    bound = {}
    for block in func.body.blocks:
        for b in block.bindings:
            if isinstance(b, relax.VarBinding):
                bound[b.var] = b.value
    pats = [re.compile(p) for p in skip]

    def resolve(e):
        while isinstance(e, relax.Var) and e in bound:
            e = bound[e]
        return e

    out = []
    for value in bound.values():
        m = match_weight_operand(value, resolve)
        if m is None:
            continue
        rhs, transposed = m
        if isinstance(rhs, relax.Var) and rhs.name in params:
            name, shape = rhs.name, params[rhs.name].shape
        elif isinstance(rhs, GenericConst):
            name, shape = "", tuple(int(d) for d in rhs.value.shape)
        else:
            continue
        if len(shape) == 2 and not any(p.search(name) for p in pats):
            k, n = (shape[1], shape[0]) if transposed else (shape[0], shape[1])
            x = value.args[0]
            xv = bound.get(x)  # through a per-matmul reshape of one activation
            if is_op(xv, "relax.reshape") and isinstance(xv.args[0], relax.Var):
                x = xv.args[0]
            out.append((name, int(k), int(n), x))
    return out


def _weight_matmul_ks(func, params, skip) -> list[int]:
    return [k for _, k, _ in weight_matmul_shapes(func, params, skip)]


def check_group(cfg: BCQConfig, func, params, skip) -> None:
    """Raise if ``cfg.group`` divides none of ``func``'s rewritten matmuls' input sizes (before any fit)."""
    _check_group(cfg, _weight_matmul_ks(func, params, skip))


def _check_group(cfg: BCQConfig, ks: list[int]) -> None:
    """A group size must divide the input size of at least one rewritten matmul (others get a shorter
    last group); one that divides none is almost certainly a mistake."""
    if cfg.layout != "row-group" or cfg.group == -1 or not ks or any(k % cfg.group == 0 for k in ks):
        return
    g = 0
    for k in ks:
        g = math.gcd(g, k)
    common = [d for d in range(4, min(g, 256) + 1, 4) if g % d == 0]
    some = [d for d in range(4, 257, 4) if any(k % d == 0 for k in ks)]
    good = sorted(set(common[-2:] + some[-3:]))
    hint = f"e.g. {', '.join(map(str, good))}, " if good else ""
    raise ValueError(
        f"group size {cfg.group} divides none of the matmul input sizes {sorted(set(ks))}; "
        f"choose a multiple of 4 that divides some of them ({hint}or -1 for one group per row)"
    )


def rewrite_lut_matmul(
    mod: tvm.IRModule,
    params: dict[str, np.ndarray],
    cfg: BCQConfig,
    skip: tuple[str, ...] = ("lm_head",),
    vec: int = DEFAULT_VEC,
    keep_dequantized: bool = False,
    func_name: str = "main",
    hessians: dict | None = None,
    fitted: dict | None = None,
    layer_bits: dict | None = None,
    kernel: str = "f32",
    knobs=None,
    also: tuple[str, ...] = (),
):
    """Apply the rewrite to ``func_name``. Returns (new module, new params dict, RewriteReport).

    ``params`` maps weight parameter names to values; the returned dict drops replaced weights
    that became unused and adds the packed ``.codes``/``.alpha`` arrays, in the new signature order.
    ``skip`` holds regular expressions matched against weight names. ``hessians`` (weight name ->
    input Hessian, from ``shiftadd.calibrate``) switches those layers to the error-feedback fit;
    ``fitted`` (weight name -> BCQWeight, e.g. from sequential calibration) supplies finished fits;
    ``layer_bits`` (weight name -> 2/3/4, from the allocator) overrides ``cfg.bits`` per layer.
    ``kernel`` 'avx2' uses the int8-table AVX2 micro-kernel (schedules/lut_avx2.py) wherever it reads
    the layout (float-table TIR kernel elsewhere); ``knobs(k, n, bits, group, offset, rows, fp8, tied)`` returns
    its (decode, batch) Knobs, e.g. from the tuning database. ``also`` names further functions of the
    module (e.g. ``decode``, the KV-cached step) rewritten with the same fits and packed weights, so all
    functions share one set of parameters; the report covers ``func_name``.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel {kernel!r}: expected one of {', '.join(KERNELS)}")
    func = mod[func_name]
    _check_group(cfg, _weight_matmul_ks(func, params, skip))
    report = RewriteReport()
    from tqdm import tqdm

    rw = _LutMatmulRewriter(
        mod, func, params, cfg, skip, vec, keep_dequantized, report, hessians, fitted, layer_bits, kernel, knobs
    )
    label = f"{cfg.bits}-bit" if not layer_bits else "mixed-bit"
    with tqdm(desc=f"BCQ {label}", unit="matmul", disable=not logger.isEnabledFor(logging.INFO), leave=False) as bar:
        rw.progress = bar
        new_func = rw.visit_expr(func)
    out = _with_params(rw, func_name, new_func)
    packed = {v.name: a for v, a in rw.new_params}
    for other in also:  # same fits, same kernels, same packed arrays: the params file is shared
        rw2 = _LutMatmulRewriter(
            out,
            out[other],
            params,
            cfg,
            skip,
            vec,
            False,
            RewriteReport(),
            None,
            {**(fitted or {}), **rw.fits},
            layer_bits,
            kernel,
            knobs,
            kernels=rw.kernels,
            packs=rw.packs,
        )
        out = _with_params(rw2, other, rw2.visit_expr(out[other]))
        for v, a in rw2.new_params:
            if v.name in packed and not np.array_equal(packed[v.name], a):
                raise AssertionError(f"'{other}' packed '{v.name}' differently from '{func_name}'")
            packed.setdefault(v.name, a)
    out = relax.transform.DeadCodeElimination([func_name, *also])(out)
    new_params: dict[str, np.ndarray] = {}
    for f in (func_name, *also):
        out, kept = drop_unused_params(out, f, {**params, **packed})
        new_params.update(kept)
    logger.info(report.summary())
    return out, new_params, report


def _with_params(rw, func_name, new_func):
    """The rewriter's module with ``func_name`` replaced by ``new_func`` plus the packed-weight params."""
    new_func = relax.Function(
        list(new_func.params) + [v for v, _ in rw.new_params],
        new_func.body,
        new_func.ret_ty,
        new_func.is_pure,
        new_func.attrs,
    )
    rw.builder_.update_func(rw.builder_.get().get_global_var(func_name), new_func)
    return rw.builder_.get()
