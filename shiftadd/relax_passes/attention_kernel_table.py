"""What the three attention passes share (scores_from_cache, values_from_cache, softmax_with_mask):
a mutator that offers every call of one operator to a pattern function, and the table of kernels
a pass adds to a module: one PrimFunc per AttentionKernel (knob from the tuning database or the
default) and the static query rows of its calls (what ``shiftadd tune`` times it at)."""

from __future__ import annotations

import tvm
from tvm import relax

from ..schedules.attention_cpu import PROMPT, AttentionKernel, default_knob, kernel
from .ir import is_op, mutate_functions


class KernelTable:
    def __init__(self, builder, knob_of=None):
        self.builder = builder
        self.knob_of = knob_of or (lambda _spec: None)
        self.funcs: dict[AttentionKernel, tvm.ir.GlobalVar] = {}
        self.rows: dict[AttentionKernel, set] = {}

    def call(self, spec: AttentionKernel, rows) -> tvm.ir.GlobalVar:
        """The GlobalVar of ``spec``'s kernel (added on first use, named with its knob); ``rows``,
        the call's query rows, are recorded (a symbolic count as PROMPT)."""
        if spec not in self.funcs:
            knob = self.knob_of(spec)
            knob = default_knob(spec) if knob is None else int(knob)
            name = f"{spec.name}_k{knob}"
            self.funcs[spec] = self.builder.add_func(kernel(spec, knob).with_attr("global_symbol", name), name)
        self.rows.setdefault(spec, set()).add(int(rows) if isinstance(rows, tvm.tirx.IntImm) else PROMPT)
        return self.funcs[spec]

    def specs(self) -> dict[AttentionKernel, list[int]]:
        """``{spec: sorted query rows of its calls}``, PROMPT for a symbolic count (a prefill)."""
        return {s: sorted(self.rows[s]) for s in self.funcs}


def float_matmul_dtype(call, a, b) -> str | None:
    """The dtype of matmul ``call`` on ``a`` and ``b`` if our kernels compute it exactly as the
    operator does (both float32 or both float16, result in that dtype), else None."""
    dtype = str(a.ty.dtype)
    out_dtype = "" if call.attrs.out_dtype is None else str(call.attrs.out_dtype)
    ok = dtype == str(b.ty.dtype) and dtype in ("float32", "float16") and out_dtype in ("", "void", dtype)
    return dtype if ok else None


@relax.expr_functor.mutator
class _CallRewriter(relax.PyExprMutator):
    def __init__(self, mod, op: str, pattern, knob_of=None):
        super().__init__(mod)
        self.op, self.pattern = op, pattern
        self.table = KernelTable(self.builder_, knob_of)
        self.rewritten = 0

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not is_op(call, self.op):
            return call
        new = self.pattern(self, call)
        if new is None:
            return call
        self.rewritten += 1
        return new


def rewrite_calls(mod: tvm.IRModule, op: str, pattern, knob_of=None, dce: bool = False):
    """Offer every call of operator ``op`` in every Relax function of ``mod`` to
    ``pattern(mutator, call)``, which returns its replacement or None (keep it); the pattern adds
    kernels through ``mutator.table`` and may emit bindings through ``mutator.builder_``. Returns
    (module, calls replaced, ``mutator.table.specs()``); ``dce``: bindings left unused are removed."""
    rw = _CallRewriter(mod, op, pattern, knob_of)
    out = mutate_functions(rw, mod, dce=(lambda: rw.rewritten) if dce else None)
    return out, rw.rewritten, rw.table.specs()
