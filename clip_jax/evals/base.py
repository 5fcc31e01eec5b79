"""What every evaluator returns."""

import dataclasses

import numpy as np


@dataclasses.dataclass
class EvalResult:
    """metrics: {"<kind>/<dataset>/<name>": float}, what training logs;
    details: anything a report can draw (e.g. zero-shot predictions)."""
    metrics: dict
    details: dict = dataclasses.field(default_factory=dict)


def row_counts(prefix, mask, is_record):
    """{prefix/examples: rows evaluated, prefix/skipped: records that could not be}
    from host arrays of eval_input's mask and is_record."""
    return {f"{prefix}/examples": int(np.sum(mask)),
            f"{prefix}/skipped": int(np.sum(is_record & ~mask))}
