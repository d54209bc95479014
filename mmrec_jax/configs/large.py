"""MM-Rec large: vocab 32000, D=3072, 20 layers, 24 heads, max_seq_len 32768.

For two nodes of 8 x H100 (16 devices) or a v5p-32 slice (16 chips): batch 256 x 8192
in 16 microbatches (one sequence per device), full rematerialisation;
`python -m mmrec_jax.plan --config=large --devices=16 --device_kind=H100,v5p` says it fits."""
from mmrec_jax.config import make_config


def get_config():
  c = make_config(
      "large", vocab_size=32000, d_model=3072, n_layers=20, n_heads=24, max_seq_len=32768,
      use_dpg=True, use_uboo=True, chunk_size=128, mem_slots=8, mem_levels=6, dtype='bfloat16', remat='full')
  c.train.batch_size = 256
  c.train.seq_len = 8192
  c.train.lr = 0.0002
  c.train.steps = 300000
  c.train.warmup_steps = 2000
  c.checkpoint.every = 1000
  c.checkpoint.keep = 3
  c.mesh.fsdp = -1
  c.mesh.data = 1
  c.train.grad_accum = 16
  return c
