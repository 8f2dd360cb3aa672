"""Experiments built on the trainer: `compare` (NTP vs NITP and ablations).

Nothing is imported here, so `python -m nitp_jax.experiments.compare` runs
the module only once.
"""
