"""The decode benchmark (`bench/decode.py`) measures a small model."""
import flax.linen as nn
import jax

from mmrec_jax import models
from mmrec_jax.bench import decode as bench_decode
from mmrec_jax.models import mmrec as M


def test_decode_benchmark_measures_a_small_model():
  cfg = M.MMRecConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, chunk_size=4,
                      mem_slots=2, mem_levels=2)
  model = M.MMRec(cfg)
  params = nn.unbox(models.init_params(model, jax.random.key(0)))
  out = bench_decode.measure_speed(model, {"params": params}, decode_tokens=3,
                                   prefill_tokens=8, reps=1)
  assert all(out[k] > 0 for k in ("decode_b1", "decode_b16", "prefill"))
  assert 0 < out["prefill_flops_per_token"] < model.flops_per_token()
