"""Sweep configs of the sweep runner, experiments/sweep.py:
``python -m experiments.sweep --config=configs/sweeps/<name>.py``."""
