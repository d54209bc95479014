"""The profiler's attribution (`bench/profile.py`): operations to their source and a
category, on CPU and on an accelerator's device timelines."""
from mmrec_jax.bench import profile

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
