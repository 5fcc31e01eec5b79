"""Building blocks of sweeps: lists of {dotted config key: value} overrides.

Kept free of heavy imports so that configs and the sweep launcher can use them
without importing JAX.
"""

import itertools


def product(axes):
    """Every combination of `axes` ({key: [values]}), the first key varying slowest.

    product({"optimizer.lr": [1e-3, 3e-3], "batch_size": [64, 128]}) -> 4 runs.
    """
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*axes.values())]


def zipped(axes):
    """Run i takes the i-th value of every key: settings that move together
    (e.g. the learning rate scaled with the batch size)."""
    lengths = {key: len(values) for key, values in axes.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"zipped sweep axes differ in length: {lengths}")
    keys = list(axes)
    return [dict(zip(keys, values)) for values in zip(*axes.values())]
