"""The attention kernels one pass adds to a module: one PrimFunc per AttentionKernel (knob from the
tuning database or the default), and the static query rows of its calls (what ``shiftadd tune``
times it at). Shared by scores_from_cache, values_from_cache and softmax_with_mask."""

from __future__ import annotations

import tvm

from ..schedules.attention_cpu import AttentionKernel, kernel


class KernelTable:
    def __init__(self, builder, knob_of=None):
        self.builder = builder
        self.knob_of = knob_of or (lambda _spec: None)
        self.funcs: dict[AttentionKernel, tvm.ir.GlobalVar] = {}
        self.rows: dict[AttentionKernel, set] = {}

    def call(self, spec: AttentionKernel, rows) -> tvm.ir.GlobalVar:
        """The GlobalVar of ``spec``'s kernel (added on first use, named with its knob); ``rows``,
        the call's query rows, are recorded when static."""
        if spec not in self.funcs:
            from ..schedules.attention_cpu import default_knob

            knob = self.knob_of(spec)
            knob = default_knob(spec) if knob is None else int(knob)
            name = f"{spec.name}_k{knob}"
            self.funcs[spec] = self.builder.add_func(kernel(spec, knob).with_attr("global_symbol", name), name)
        if isinstance(rows, tvm.tirx.IntImm):
            self.rows.setdefault(spec, set()).add(int(rows))
        return self.funcs[spec]

    def specs(self) -> dict[AttentionKernel, list[int]]:
        """``{spec: sorted static query rows of its calls, or [1] if none was static}``."""
        return {s: sorted(self.rows.get(s, ())) or [1] for s in self.funcs}
