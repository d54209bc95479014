"""MM-Rec medium: vocab 32000, D=2048, 16 layers, 16 heads, max_seq_len 16384.

For one node of 8 x H100 (80 GB): batch 128 x 8192 in 16 microbatches (one sequence per
device), full rematerialisation; `python -m mmrec_jax.plan --config=medium --devices=8`
says it fits."""
from mmrec_jax.config import make_config


def get_config():
  c = make_config(
      "medium", vocab_size=32000, d_model=2048, n_layers=16, n_heads=16, max_seq_len=16384,
      use_dpg=True, chunk_size=128, mem_slots=8, mem_levels=5, dtype='bfloat16', remat='full')
  c.train.batch_size = 128
  c.train.seq_len = 8192
  c.train.lr = 0.0003
  c.train.steps = 200000
  c.train.warmup_steps = 2000
  c.checkpoint.every = 1000
  c.checkpoint.keep = 3
  c.mesh.fsdp = -1
  c.mesh.data = 1
  c.train.grad_accum = 16
  return c
