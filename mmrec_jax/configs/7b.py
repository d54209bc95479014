"""MM-Rec 7b: vocab 32000, D=4096, 21 layers, 32 heads, max_seq_len 32768.

For a v5p-64 slice (32 chips) or 32+ x H100: batch 512 x 8192 in 16 microbatches (one
sequence per device at 32), full rematerialisation; `python -m mmrec_jax.plan
--config=7b --devices=32 --device_kind=v5p,H100` says it fits."""
from mmrec_jax.config import make_config


def get_config():
  c = make_config(
      "7b", vocab_size=32000, d_model=4096, n_layers=21, n_heads=32, max_seq_len=32768,
      use_dpg=True, use_uboo=True, chunk_size=128, mem_slots=8, mem_levels=6, dtype='bfloat16', remat='full')
  c.train.batch_size = 512
  c.train.seq_len = 8192
  c.train.lr = 0.00015
  c.train.steps = 500000
  c.train.warmup_steps = 2000
  c.checkpoint.every = 1000
  c.checkpoint.keep = 3
  c.mesh.fsdp = -1
  c.mesh.data = 1
  c.train.grad_accum = 16
  return c
