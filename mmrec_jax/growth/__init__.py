"""Progressive growth: the function-preserving parameter expander (expander.py),
a grown run as a ready-to-train workdir (workdir.py) and the ladder of stages
(ladder.py)."""
from mmrec_jax.growth.expander import (check_growable, grow_params, grow_state, inexact_reasons,
                                       logit_diff)
from mmrec_jax.growth.workdir import check_extends, grow_workdir, new_token_pieces

__all__ = ["check_growable", "grow_params", "grow_state", "inexact_reasons", "logit_diff",
           "check_extends", "grow_workdir", "new_token_pieces"]
