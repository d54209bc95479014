"""Transformer baseline at MM-Rec mini's size: vocab 10000, D=256, 9 layers, 4 heads
(9,654,272 parameters, 3.9% under mini's), the same training settings as mini."""
from mmrec_jax.config import make_config


def get_config():
  c = make_config(
      "transformer_mini", kind="transformer", vocab_size=10000, d_model=256, n_layers=9,
      n_heads=4, max_seq_len=2048)
  c.train.batch_size = 8
  c.train.seq_len = 1024
  return c
