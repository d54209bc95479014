"""MM-Rec tiny: vocab 5000, D=128, 4 layers, 4 heads, max_seq_len 1024."""
from mmrec_jax.config import make_config


def get_config():
  c = make_config(
      "tiny", vocab_size=5000, d_model=128, n_layers=4, n_heads=4, max_seq_len=1024,
      # memory geometry shared by tiny -> mini -> small: each grows into the next exactly
      chunk_size=64, mem_slots=8, mem_levels=4,
      scan_layers=False)  # 4 layers: unrolled is faster on CPU and compiles quickly
  c.train.steps = 600
  c.train.eval_every = 100
  c.checkpoint.every = 200
  return c
