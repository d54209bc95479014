"""The README's code runs as written."""
import re

import jax.numpy as jnp


def _python_block_after(heading):
  text = open("README.md").read()
  section = text.split(heading, 1)[1]
  return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_research_code_example_runs_as_written():
  ns = {}
  exec(_python_block_after("## Using the model from a fresh init"), ns)  # noqa: S102
  assert ns["logits"].shape == (2, 1, 5000)
  assert bool(jnp.isfinite(ns["logits"]).all())
  assert ns["state"].h.shape == (4, 2, 128)
