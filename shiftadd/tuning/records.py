"""What a build applies from the tuning database of a target: our attention kernels' knobs and the
MetaSchedule records of the float operators (the knobs of the LUT kernels are looked up by the
rewrite, kernel by kernel)."""

from __future__ import annotations

from dataclasses import dataclass

from .database import TuningDB
from .metaschedule import apply_float


@dataclass
class Records:
    db: TuningDB
    source: object  # the database argument as given (a file, a folder or None: the user's)
    target: object

    def attention_knob(self, spec):
        return self.db.attention_knob(spec)

    def apply(self, lowered):
        return apply_float(lowered, self.target, self.source)


def records(db, target) -> Records:
    """The records of ``db`` (a file or folder; None: ~/.cache/shiftadd/tuning.json or
    $SHIFTADD_TUNING_DB) for ``target``."""
    return Records(TuningDB.open(db, target=target), db, target)
