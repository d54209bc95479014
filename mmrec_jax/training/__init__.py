"""Training: the train state and its jitted steps (state.py, step.py), the loss,
the optimizer, shardings, metrics, and the loop with its hooks (`run`)."""
