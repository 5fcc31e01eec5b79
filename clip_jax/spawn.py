"""Spawned worker processes (the training input's) import their parent's
`__main__` module before they start, so that objects defined there unpickle.
A clip_jax command's `__main__` is its CLI module (clip_jax.train imports
TensorFlow, JAX and Flax: about 775 MB resident per worker), and nothing a
worker receives is defined there. The commands call `detach_main_module()`
first, so their workers start from a bare interpreter. Library code does not:
a user's own script may need its `__main__` in its own workers."""

import sys


def detach_main_module():
    """Makes spawned children skip importing this process's __main__."""
    main = sys.modules["__main__"]
    main.__spec__ = None  # spawn would re-import the module by name...
    if hasattr(main, "__file__"):
        del main.__file__  # ...or else run the file as __mp_main__
