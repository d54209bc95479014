"""MM-Rec base: vocab 32000, D=1024, 12 layers, 8 heads, max_seq_len 8192."""
from mmrec_jax.config import make_config


def get_config():
  c = make_config(
      "base", vocab_size=32000, d_model=1024, n_layers=12, n_heads=8, max_seq_len=8192,
      chunk_size=64, mem_slots=8, mem_levels=5)
  c.train.batch_size = 64
  c.train.seq_len = 4096
  c.train.lr = 0.0006
  c.train.steps = 100000
  c.train.warmup_steps = 2000
  c.checkpoint.every = 1000
  c.checkpoint.keep = 3
  return c
