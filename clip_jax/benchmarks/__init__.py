"""One module per benchmark of `python -m clip_jax.benchmark` (the CLI): importing
them starts nothing; the CLI asks for simulated devices before running one."""
