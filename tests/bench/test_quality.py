"""The quality benchmark's arms (`bench/quality.py`)."""


def test_quality_carries_the_state_of_the_mmrec_arms_only():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl.testing import flagsaver  # pylint: disable=g-import-not-at-top
  from mmrec_jax.bench import quality  # pylint: disable=g-import-not-at-top
  marked = not flags.FLAGS.is_parsed()
  if marked:
    flags.FLAGS.mark_as_parsed()
  try:
    for carry in (False, True):
      with flagsaver.flagsaver(carry_state=carry, seq_len=64, batch=2):
        got = {arm: quality.arm_config(arm, 0, 4, "").train.carry_state
               for arm in ("mmrec", "mmrec_nomem", "transformer")}
      # the Transformer has no fixed-size state to carry: it always trains window by window
      assert got == {"mmrec": carry, "mmrec_nomem": carry, "transformer": False}
  finally:
    if marked:
      flags.FLAGS.unparse_flags()
