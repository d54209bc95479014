"""MM-Rec: blocks with a gated linear recurrence (short-term memory) and a
bounded hierarchical long-term memory of chunk summaries (HDS).

config.py (the model section), scan.py (the recurrence's one entry point),
memory.py (HDS math: pure functions), hds.py (the memory layer), block.py (one
block), model.py (the language model), growth.py (its growth rules).
"""
from mmrec_jax.models.mmrec.config import MMRecConfig
from mmrec_jax.models.mmrec.hds import LayerState
from mmrec_jax.models.mmrec.model import MMRec

__all__ = ["MMRec", "MMRecConfig", "LayerState"]
