"""Relax pass for calibration: make ``main`` also return the input of every weight matmul.

Each matched ``R.matmul(x, W)`` (same pattern as the rewrite pass) gets ``x`` flattened to [M, K]
emitted as a dataflow *output*, and the function returns ``(original result, x_1, x_2, ...)``.
Running the compiled module on calibration inputs then yields every layer's activations, from which
``shiftadd.calibrate`` accumulates the Hessians ``Σ x xᵀ`` in float64. Works on any imported ONNX
model, not only Hugging Face ones.
"""

from __future__ import annotations

import re

import tvm
from tvm import relax
from tvm.ir import GenericConst

from .rewrite_lut_matmul import match_weight_operand


@relax.expr_functor.mutator
class _Capture(relax.PyExprMutator):
    def __init__(self, mod, params, skip):
        super().__init__(mod)
        self.params = params
        self.skip = [re.compile(p) for p in skip]
        self.captured: list[tuple[str, relax.Var]] = []
        self.n_const = 0

    def _resolve(self, expr):
        while isinstance(expr, relax.Var):
            bound = self.lookup_binding(expr)
            if bound is None:
                break
            expr = bound
        return expr

    def visit_call_(self, call):
        call = super().visit_call_(call)
        m = match_weight_operand(call, self._resolve)
        if m is None:
            return call
        rhs, transposed = m
        if isinstance(rhs, relax.Var) and rhs.name in self.params and self.params[rhs.name].ndim == 2:
            name, shape = rhs.name, self.params[rhs.name].shape
        elif isinstance(rhs, GenericConst) and len(rhs.value.shape) == 2:
            self.n_const += 1
            name, shape = f"const_{self.n_const}", tuple(int(d) for d in rhs.value.shape)
        else:
            return call
        if any(p.search(name) for p in self.skip):
            return call
        k = int(shape[1] if transposed else shape[0])
        x = call.args[0]
        if x.ty.dtype != "float32":
            return call
        flat = self.builder_.emit_output(relax.op.reshape(x, relax.ShapeExpr([-1, k]))
                                         if len(x.ty.shape.values) != 2 else x)
        self.captured.append((name, flat))
        return call


def capture_matmul_inputs(mod: tvm.IRModule, params: dict, skip: tuple[str, ...] = ("lm_head",),
                          func_name: str = "main"):
    """Returns (module whose ``main`` returns (result, *inputs), [weight name per captured input])."""
    cap = _Capture(mod, params, skip)
    func = mod[func_name]
    new = cap.visit_expr(func)
    if not cap.captured:
        raise ValueError("calibration: the model has no weight matmuls to calibrate")
    body = new.body
    outs = relax.Tuple([body.body, *[v for _, v in cap.captured]])
    ret = relax.TupleType([body.body.ty, *[v.ty for _, v in cap.captured]])
    new = relax.Function(new.params, relax.SeqExpr(body.blocks, outs), ret, new.is_pure, new.attrs)
    cap.builder_.update_func(cap.builder_.get().get_global_var(func_name), new)
    out = relax.transform.Normalize()(cap.builder_.get())
    return out, [n for n, _ in cap.captured]
