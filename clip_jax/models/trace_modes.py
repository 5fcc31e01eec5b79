"""Modes read while a model is traced (config.model.lean_backward,
config.model.grad_reduce_dtype): a context variable set around the trace, so
that no tower needs them as module attributes."""

import contextlib


@contextlib.contextmanager
def active(variable, key, choices, mode):
    """`variable` holds `mode` inside; an unknown mode names config.model.`key`."""
    if mode not in choices:
        raise ValueError(f"config.model.{key}={mode!r} is unknown; "
                         f"choose one of {', '.join(choices)}")
    token = variable.set(mode)
    try:
        yield
    finally:
        variable.reset(token)
