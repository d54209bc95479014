"""Inference: sampling and the jitted decode loop (sampling.py), evaluation and
the loss by position (evaluation.py)."""
