"""Transformer baseline at MM-Rec tiny's size: vocab 5000, D=128, 6 layers, 4 heads
(1,825,152 parameters, 3.5% under tiny's), the same training settings as tiny."""
from mmrec_jax.config import make_config


def get_config():
  c = make_config(
      "transformer_tiny", kind="transformer", vocab_size=5000, d_model=128, n_layers=6,
      n_heads=4, max_seq_len=1024, scan_layers=False)
  c.train.steps = 600
  c.train.eval_every = 100
  c.checkpoint.every = 200
  return c
