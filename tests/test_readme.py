"""The README's code runs as written."""
import contextlib
import io
import re

import jax.numpy as jnp


def _python_block_with(text):
  """The README's first Python block containing `text`."""
  blocks = re.findall(r"```python\n(.*?)```", open("README.md").read(), re.S)
  return next(b for b in blocks if text in b)


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


def test_load_example_runs_as_written(run_dir, loaded):
  """The example of `load` ("runs/tiny" replaced by the fixture's workdir)."""
  example = _python_block_with("from mmrec_jax import load")
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(example.replace("runs/tiny", run_dir), {})  # pylint: disable=exec-used
  model, variables, tok, _, dec = loaded
  ids = dec.generate(variables, [tok.encode("def main(").ids], 8, temperature=0)[0]
  assert len(ids) == 8  # (no <|eod|> in the first 8 greedy tokens of this model)
  assert out.getvalue() == "".join(tok.decode([i]) for i in ids)
