"""The benchmark tools' own logic (what they measure is timed by running them)."""
import flax.linen as nn
import jax
import pytest

from mmrec_jax import models
from mmrec_jax.bench import decode as bench_decode
from mmrec_jax.bench import profile
from mmrec_jax.models import mmrec as M

HLO = '''
%fused_computation.7 (param_0: f32[4,8]) -> f32[4,8] {
  %param_0 = f32[4,8]{1,0} parameter(0)
  ROOT %exp.1 = f32[4,8]{1,0} exponential(%param_0), metadata={op_name="jit(train_step)/jvp()/exp"}
}

ENTRY %main {
  %dot.3 = f32[4,8]{1,0} dot(%a, %b), metadata={op_name="jit(train_step)/jvp(MMRec)/closed_call/blocks/ffn/up/dot_general"}
  %subtract_exponential_fusion = f32[4,8]{1,0} fusion(%dot.3), kind=kLoop, calls=%fused_computation.7
  %copy.2 = f32[4,8]{1,0} copy(%x)
}
'''


def test_profile_attributes_operations_to_their_source():
  src = profile.op_sources(HLO)
  assert src["dot.3"].endswith("ffn/up/dot_general")
  assert src["subtract_exponential_fusion"] == "jit(train_step)/jvp()/exp"  # via its callee
  assert "copy.2" not in src
  events = [{"ph": "X", "name": "dot.3", "dur": 3000},
            {"ph": "X", "name": "subtract_exponential_fusion", "dur": 1000},
            {"ph": "X", "name": "copy.2", "dur": 2000},
            {"ph": "X", "name": "while.1", "dur": 9000},   # spans its body: not counted
            {"ph": "X", "name": "ThunkExecutor::Execute", "dur": 9000},
            {"ph": "i", "name": "dot.3"}]
  by_cat, ops = profile.summarize(events, src, steps=2)
  assert by_cat == {"matmul": 1.5, "head & loss": 0.5, "layout": 1.0}
  assert ops[0] == (1.5, "jvp(MMRec)/closed_call/blocks/ffn/up/dot_general", "dot")


def test_profile_counts_only_device_timelines_on_an_accelerator():
  src = profile.op_sources(HLO)
  events = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
            {"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/device:GPU:0"}},
            # host spans enclose the device's work: not operations
            {"ph": "X", "pid": 1, "name": "PjRtCApiLoadedExecutable::Execute", "dur": 9000},
            {"ph": "X", "pid": 1, "name": "dot.3", "dur": 9000},
            # a kernel is named by CUDA, and carries the HLO operation it ran
            {"ph": "X", "pid": 7, "name": "sm90_xmma_gemm_bf16", "dur": 4000,
             "args": {"hlo_op": "dot.3"}},
            {"ph": "X", "pid": 7, "name": "copy.2", "dur": 2000}]
  by_cat, ops = profile.summarize(events, src, steps=2)
  assert by_cat == {"matmul": 2.0, "layout": 1.0}
  assert ops[0][1].endswith("ffn/up/dot_general")


def test_profile_categories():
  c = profile.category
  assert c("ynn_fusion", "jit(train_step)/transpose(jvp(MMRec))/btd,vd->btv/dot_general") == "matmul"
  assert c("select_fusion", "jit(train_step)/jvp(MMRec)/closed_call/blocks/memory/vmap()/select_n") == "memory"
  assert c("add_fusion", "jit(train_step)/jvp(MMRec)/closed_call/blocks/while/body/add") == "recurrence"
  assert c("multiply_fusion", "jit(train_step)/mul") == "optimizer"
  assert c("tanh_fusion", "jit(train_step)/jvp(MMRec)/closed_call/blocks/ffn/tanh") == "elementwise"


def test_decode_benchmark_measures_a_small_model():
  cfg = M.MMRecConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, chunk_size=4,
                      mem_slots=2, mem_levels=2)
  model = M.MMRec(cfg)
  params = nn.unbox(models.init_params(model, jax.random.key(0)))
  out = bench_decode.measure_speed(model, {"params": params}, decode_tokens=3,
                                   prefill_tokens=8, reps=1)
  assert all(out[k] > 0 for k in ("decode_b1", "decode_b16", "prefill"))
  assert 0 < out["prefill_flops_per_token"] < model.flops_per_token()


def test_an_interrupted_arm_stops_the_benchmark(monkeypatch):
  """A benchmark whose training run was stopped by a signal exits (130 / 143)
  instead of scoring the half-trained model; a finished run is returned."""
  from mmrec_jax import bench, loop, train
  from mmrec_jax.errors import Interrupted
  result = {}
  monkeypatch.setattr(train, "run", lambda c, w, quiet, **kw: result["r"])
  result["r"] = loop.Result(601, "interrupted", [], [], signal="SIGTERM")
  with pytest.raises(Interrupted, match="interrupted by SIGTERM at step 601") as e:
    bench.train_arm(None, "wd")
  assert e.value.exit_code == 143
  result["r"] = loop.Result(1000, "done", [], [])
  assert bench.train_arm(None, "wd").step == 1000


def test_quality_carries_the_state_of_the_mmrec_arms_only():
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl.testing import flagsaver  # pylint: disable=g-import-not-at-top
  from mmrec_jax.bench import quality  # pylint: disable=g-import-not-at-top
  marked = not flags.FLAGS.is_parsed()
  if marked:
    flags.FLAGS.mark_as_parsed()
  try:
    for carry in (False, True):
      with flagsaver.flagsaver(carry_state=carry, seq_len=64, batch=2):
        got = {arm: quality.arm_config(arm, 0, 4, "").train.carry_state
               for arm in ("mmrec", "mmrec_nomem", "transformer")}
      # the Transformer has no fixed-size state to carry: it always trains window by window
      assert got == {"mmrec": carry, "mmrec_nomem": carry, "transformer": False}
  finally:
    if marked:
      flags.FLAGS.unparse_flags()


def test_an_arm_never_reuses_a_run_trained_otherwise(tmp_path):
  """A benchmark folder from before an arm's defaults changed: the arm that keeps
  the old values reuses its run, the arm at the new defaults refuses it (one-line
  error naming the fields), and a field saved before it existed counts at its old
  value."""
  import json
  from mmrec_jax import bench
  from mmrec_jax.errors import UsageError
  old = bench.load_arm("mmrec_v0")
  saved = old.to_dict()
  del saved["model"]["mem_lr_scale"]          # a config saved before the field existed
  (tmp_path / "config.json").write_text(json.dumps(saved))
  bench.check_same_run(bench.load_arm("mmrec_v0"), str(tmp_path))
  with pytest.raises(UsageError, match="mem_lr_scale, model.mem_out_init differ") as e:
    bench.check_same_run(bench.load_arm("mmrec"), str(tmp_path))
  assert "\n" not in str(e.value)
  nomem = bench.load_arm("mmrec_nomem").to_dict()
  nomem["model"].update(mem_out_init=1.0, mem_lr_scale=1.0)   # no memory: they mean nothing
  (tmp_path / "config.json").write_text(json.dumps(nomem))
  bench.check_same_run(bench.load_arm("mmrec_nomem"), str(tmp_path))
  seeded = bench.load_arm("mmrec_nomem")
  seeded.train.seed = 7
  with pytest.raises(UsageError, match="train.seed"):
    bench.check_same_run(seeded, str(tmp_path))
