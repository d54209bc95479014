"""MM-Rec small: vocab 20000, D=512, 8 layers, 8 heads, max_seq_len 4096."""
from mmrec_jax.config import make_config


def get_config():
  c = make_config(
      "small", vocab_size=20000, d_model=512, n_layers=8, n_heads=8, max_seq_len=4096,
      # memory geometry shared by tiny -> mini -> small: each grows into the next exactly
      chunk_size=64, mem_slots=8, mem_levels=4)
  c.train.batch_size = 16
  c.train.seq_len = 2048
  c.train.lr = 0.001
  return c
