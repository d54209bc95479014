"""MM-Rec mini: vocab 10000, D=256, 6 layers, 4 heads, max_seq_len 2048."""
from mmrec_jax.config import make_config


def get_config():
  c = make_config(
      "mini", vocab_size=10000, d_model=256, n_layers=6, n_heads=4, max_seq_len=2048,
      # memory geometry shared by tiny -> mini -> small: each grows into the next exactly
      chunk_size=64, mem_slots=8, mem_levels=4)
  c.train.batch_size = 8
  c.train.seq_len = 1024
  return c
