"""The optimizer state grown with the parameters: AdamW's moments and step counts
carried into the grown model, so training continues instead of restarting.

    big_opt = grow_opt_state(small_opt, small_cfg, big_cfg, big_template)

Every Adam state (`optax.ScaleByAdamState`) in the tree has its first and second
moments grown by the parameters' own maps (`expander.grow_params(mode=...)`):
copied units share their moments; a split input axis divides the first moment
like the parameter and the second by the square, so each copy's normalised
update m / sqrt(v) is the small model's (the k copies of a unit together then
move the function k times as far as the small model's step: Adam is not
width-invariant); inserted identity blocks and new vocabulary rows start at
zero, and so do parameters the small model lacks (with the step count kept,
Adam's bias correction is then ~1, so their first updates are several times
the learning rate: a likely cause of the loss rise right after growth,
docs/experiments/growth.md). Step counts
(Adam's bias correction, the schedule's position) are kept. Everything else in the
state (clipping, masks) has no per-parameter values and is taken from
`big_template`, a fresh `tx.init` of the big parameters.

Where growth is exact and adds only identity blocks (the same width and
vocabulary), one step of the grown model from the carried state moves the old
coordinates exactly as one step of the small model moves them (without gradient
clipping: the global norm includes the new blocks' gradients).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mmrec_jax.growth import expander


NEW_MOMENTS = ("zero", "neighbour")


def _is_adam(x):
  return isinstance(x, optax.ScaleByAdamState)


def grow_opt_state(small_opt, small_cfg, big_cfg, big_template, depth="identity",
                   vocab_pieces=None, allow_inexact=False, new_moments="zero"):
  """The big model's optimizer state from the small model's (see the module docstring).
  `new_moments="neighbour"`: an inserted identity block's second moment is that of
  the block it copies (its first moment still zero), so its first updates are about
  the learning rate's size instead of several times it."""
  if new_moments not in NEW_MOMENTS:
    raise ValueError(f"new_moments={new_moments!r}: use one of {', '.join(NEW_MOMENTS)}")
  nu_mode = "nu_neighbour" if new_moments == "neighbour" else "nu"
  small_nodes = jax.tree.leaves(small_opt, is_leaf=_is_adam)
  big_nodes, treedef = jax.tree.flatten(big_template, is_leaf=_is_adam)
  if len(small_nodes) != len(big_nodes):
    raise ValueError("the optimizer states have different structures: grow with the same "
                     "optimizer settings")
  grow = lambda tree, mode: expander.grow_params(
      tree, small_cfg, big_cfg, jax.random.key(0), vocab_pieces=vocab_pieces,
      allow_inexact=allow_inexact, depth=depth, mode=mode)
  out = []
  for s, b in zip(small_nodes, big_nodes):
    if _is_adam(b):
      out.append(optax.ScaleByAdamState(
          count=jnp.asarray(s.count, b.count.dtype), mu=grow(s.mu, "mu"),
          nu=grow(s.nu, nu_mode)))
    elif hasattr(b, "shape") and hasattr(s, "shape") and b.shape == s.shape == ():
      out.append(jnp.asarray(s, b.dtype))   # a count: the position continues
    else:
      out.append(b)
  return jax.tree.unflatten(treedef, out)
