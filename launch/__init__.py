"""Launchers: TPU VMs, SLURM clusters, local multi-process runs, config sweeps."""
