"""`python tests/slow_train.py SECONDS <train flags>`: the train CLI with every step
slowed by SECONDS, so tests can signal or kill a run between steps."""
import sys
import time

import jax

from mmrec_jax import train
from mmrec_jax.training import state as train_state


def main():
  delay = float(sys.argv.pop(1))
  make = train_state.setup

  def slow_setup(*args, **kwargs):
    s = make(*args, **kwargs)
    step = s.train_step

    def slow_step(*a):
      out = step(*a)
      jax.block_until_ready(out[1])
      time.sleep(delay)
      return out
    s.train_step = slow_step
    return s

  train_state.setup = slow_setup
  train.entry()


if __name__ == "__main__":
  main()
