"""What a compile is asked to do: one frozen dataclass per concern, each checking its own fields once,
named quantization presets and optimization levels (as MLC-LLM's quantization registry and
compiler-flag levels), and ``key=value`` overrides on top (the CLI's ``--set``)."""

from __future__ import annotations

import math
import re
import typing
from dataclasses import asdict, dataclass, field, fields

if typing.TYPE_CHECKING:
    from .quant.bcq import BCQConfig

CALIBRATION_MODES = ("one-pass", "sequential")
ALLOCATORS = ("budget", "ratio")
KERNEL_CHOICES = ("auto", "f32", "avx2")
DEFAULT_CALIB_WINDOWS = 128  # x 128 tokens (docs/QUALITY.md: 16 windows over-fit the Hessians)


@dataclass(frozen=True)
class QuantConfig:
    """How every weight matmul is reparameterized (BCQ planes, power-of-two scales); ``rewrite``
    False keeps the float model (the exactness baseline)."""

    rewrite: bool = True
    bits: int = 3
    avg_bits: float | None = None  # mixed precision: 2/3/4 bits per layer under this average
    allocator: str = "budget"  # budget: exact knapsack on predicted error | ratio: the paper's rule
    group: int = 64
    layout: str = "row-group"
    block_rows: int = 64
    scale_format: str = "fp16"
    tied: bool = False
    offset: bool = True
    apot_terms: int = 3
    rounds: int = 6
    skip: tuple[str, ...] = ("lm_head",)

    def __post_init__(self):
        from .quant.allocate import CHOICES, check_budget  # torch: imported when a config is made, not by the CLI

        self.bcq(refits=0)  # BCQConfig checks bits, group, layout, formats, terms and rounds
        if self.avg_bits is not None:
            check_budget(self.avg_bits, CHOICES)
        if self.allocator not in ALLOCATORS:
            raise ValueError(f"allocator must be one of {ALLOCATORS}, got '{self.allocator}'")
        for p in self.skip:
            try:
                re.compile(p)
            except re.error as e:
                raise ValueError(f"skip pattern {p!r} is not a regular expression: {e}") from None

    def bcq(self, refits: int) -> BCQConfig:
        """The fits' config: this one's shared fields and the calibration's ``refits``."""
        from .quant.bcq import BCQConfig

        shared = {f.name: getattr(self, f.name) for f in fields(BCQConfig) if f.name != "refits"}
        return BCQConfig(**shared, refits=refits)


@dataclass(frozen=True)
class CalibrationConfig:
    """The fits' data: ``windows`` x ``length`` tokens of the packaged wiki text (None: the default
    when the model has a tokenizer, else weight-only), one float pass or block by block, the
    output-error refits, the loss-aware allocation and the end-to-end scale-tuning steps."""

    windows: int | None = None
    length: int = 128
    mode: str = "one-pass"
    refits: int = 3
    loss_aware: bool = True
    tune_scales: int = 0

    def __post_init__(self):
        if self.mode not in CALIBRATION_MODES:
            raise ValueError(f"calibration mode must be one of {CALIBRATION_MODES}, got '{self.mode}'")
        if (self.windows is not None and self.windows < 0) or self.length < 2:
            raise ValueError(f"calibration needs windows >= 0 and length >= 2, got {self.windows} and {self.length}")
        if self.refits < 0:
            raise ValueError(f"refits must be >= 0, got {self.refits}")
        if self.tune_scales < 0:
            raise ValueError(f"tune_scales (steps) must be >= 0, got {self.tune_scales}")


@dataclass(frozen=True)
class OptimizationConfig:
    """Which kernels and graph rewrites the compile uses; ``tune`` tunes the LUT kernels missing
    from the tuning database on this machine during the compile."""

    kernel: str = "auto"  # auto: the AVX2 micro-kernel where the target has AVX2, else float tables
    int8_batch: bool = True  # M > 1 on the int8 path where the CPU has it (else the LUT tables)
    stack_siblings: bool = True  # Q/K/V and gate/up as one kernel call
    share_kv: bool = True  # grouped-query attention reads each key/value head once
    attention: bool = True  # attention over the KV cache on our kernels
    kv_cache: bool = True  # Hugging Face models: prefill + decode functions over one cache
    tune: bool = False

    def __post_init__(self):
        if self.kernel not in KERNEL_CHOICES:
            raise ValueError(f"kernel {self.kernel!r}: expected 'auto' or one of {', '.join(KERNEL_CHOICES[1:])}")


@dataclass(frozen=True)
class CompileOptions:
    """Everything a compile is asked for, with the names of the preset and level it started from."""

    quant: QuantConfig = field(default_factory=QuantConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    optimization: OptimizationConfig = field(default_factory=OptimizationConfig)
    preset: str = "q4-tied"
    opt_level: str = "O2"

    def __post_init__(self):
        q, c = self.quant, self.calibration
        if c.tune_scales and q.layout != "row-group":
            raise ValueError(
                f"scale tuning tunes the row-group layout's scales; got layout '{q.layout}' "
                "(use layout=row-group, or tune_scales=0)"
            )

    def bcq(self) -> BCQConfig:
        return self.quant.bcq(self.calibration.refits)

    def manifest(self) -> dict:
        return {
            "preset": self.preset,
            "opt": self.opt_level,
            "quant": asdict(self.quant),
            "calibration": asdict(self.calibration),
            "optimization": asdict(self.optimization),
        }


# -- named presets and levels -------------------------------------------------------------------
# name -> (what it is, the fields it sets; the rest are the dataclass defaults)
QUANT_PRESETS: dict[str, tuple[str, dict]] = {
    "q3": ("3-bit BCQ, group 64, float16 APoT scales and offsets", dict(bits=3)),
    "q2": ("2-bit BCQ, group 64, float16 APoT scales and offsets", dict(bits=2)),
    "q4": ("4-bit BCQ, group 64, float16 APoT scales and offsets", dict(bits=4)),
    "q4-tied": (
        "the default: 4-bit, one tied e5m2 scale per row and group of 128 (the uniform grid as sign "
        "planes), every matmul including lm_head (docs/BENCHMARKS.md: the measured front)",
        dict(bits=4, group=128, scale_format="e5m2", tied=True, skip=()),
    ),
    "q2-tied": (
        "2-bit, one tied e5m2 scale per row and group of 128",
        dict(bits=2, group=128, scale_format="e5m2", tied=True),
    ),
    "mix2.5": ("2/3/4 bits per layer under an average of 2.5 (loss-aware knapsack)", dict(avg_bits=2.5)),
    "mix3.0": ("2/3/4 bits per layer under an average of 3.0 (loss-aware knapsack)", dict(avg_bits=3.0)),
    "none": ("no rewrite: the float model (the exactness baseline)", dict(rewrite=False)),
}

OPT_LEVELS: dict[str, tuple[str, dict]] = {
    "O0": (
        "portable float-table kernel, nothing fused (the exactness reference)",
        dict(kernel="f32", int8_batch=False, stack_siblings=False, share_kv=False, attention=False),
    ),
    "O1": (
        "the AVX2/AVX-512 micro-kernel on LUT tables at every batch size, nothing fused",
        dict(int8_batch=False, stack_siblings=False, share_kv=False, attention=False),
    ),
    "O2": (
        "O1 + int8 prefill path, sibling stacking, shared KV heads, attention kernels over the cache",
        dict(),
    ),
    "O3": (
        "O2 + tune the kernels missing from the tuning database on this machine during the compile",
        dict(tune=True),
    ),
}
DEFAULT_PRESET, DEFAULT_OPT = "q4-tied", "O2"

SECTIONS = {"quant": QuantConfig, "calibration": CalibrationConfig, "optimization": OptimizationConfig}
FIELD_SECTION = {f.name: s for s, cls in SECTIONS.items() for f in fields(cls)}


def _parse(cls, name: str, text):
    """A ``--set`` value (text, or already a Python value from the API) as field ``name`` of ``cls`` wants it."""
    hint = typing.get_type_hints(cls)[name]
    args = typing.get_args(hint)
    optional = type(None) in args
    base = (
        next((a for a in args if a is not type(None)), hint) if args and typing.get_origin(hint) is not tuple else hint
    )
    if not isinstance(text, str):
        return tuple(text) if typing.get_origin(base) is tuple else text
    t = text.strip()
    if optional and t.lower() in ("none", "null", ""):
        return None
    try:
        if base is bool:
            if t.lower() in ("1", "true", "yes", "on"):
                return True
            if t.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if base is int:
            return int(t)
        if base is float:
            v = float(t)
            if not math.isfinite(v):
                raise ValueError
            return v
        if typing.get_origin(base) is tuple:
            return tuple(p for p in (s.strip() for s in t.split(",")) if p)
        return t
    except ValueError:
        kind = getattr(base, "__name__", str(base))
        raise ValueError(f"--set {name}={text}: expected {kind}{' or none' if optional else ''}") from None


def parse_sets(items) -> dict:
    """``["group=128", "tied=true"]`` -> ``{"group": "128", "tied": "true"}`` (checked by resolve)."""
    out = {}
    for item in items or ():
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"--set {item!r}: expected KEY=VALUE, e.g. --set group=128")
        out[key.strip()] = value
    return out


def resolve(preset: str = DEFAULT_PRESET, opt: str = DEFAULT_OPT, overrides: dict | None = None) -> CompileOptions:
    """The preset's quantization, the level's optimization, the default calibration, then
    ``overrides`` (field name, or ``section.field``, -> value or its text)."""
    if preset not in QUANT_PRESETS:
        raise ValueError(f"unknown quantization preset {preset!r}: expected one of {', '.join(QUANT_PRESETS)}")
    if opt not in OPT_LEVELS:
        raise ValueError(f"unknown optimization level {opt!r}: expected one of {', '.join(OPT_LEVELS)}")
    changes: dict[str, dict] = {
        "quant": dict(QUANT_PRESETS[preset][1]),
        "calibration": {},
        "optimization": dict(OPT_LEVELS[opt][1]),
    }
    for key, value in (overrides or {}).items():
        section, _, name = key.rpartition(".")
        if not section:
            section = FIELD_SECTION.get(name)
        if section not in SECTIONS or name not in FIELD_SECTION or FIELD_SECTION[name] != section:
            raise ValueError(
                f"unknown option {key!r}: expected one of {', '.join(FIELD_SECTION)} "
                "(or section.field with section quant, calibration or optimization)"
            )
        changes[section][name] = _parse(SECTIONS[section], name, value)
    parts = {s: cls(**changes[s]) for s, cls in SECTIONS.items()}
    return CompileOptions(parts["quant"], parts["calibration"], parts["optimization"], preset, opt)


def describe() -> str:
    """The presets and levels with every field, for ``shiftadd presets``."""
    lines = ["quantization presets (--quant):"]
    for name, (doc, sets) in QUANT_PRESETS.items():
        lines.append(f"  {name:8s} {doc}")
        lines.append("           " + ", ".join(f"{k}={v}" for k, v in asdict(QuantConfig(**sets)).items()))
    lines.append("optimization levels (--opt):")
    for name, (doc, sets) in OPT_LEVELS.items():
        lines.append(f"  {name:8s} {doc}")
        lines.append("           " + ", ".join(f"{k}={v}" for k, v in asdict(OptimizationConfig(**sets)).items()))
    lines.append("calibration (--set): " + ", ".join(f"{k}={v}" for k, v in asdict(CalibrationConfig()).items()))
    return "\n".join(lines)
