"""Pallas kernels for the memory recurrence h_t = a_t * h_{t-1} + b_t.

`linear_scan_pallas(a, b, h0, reset)` has the semantics of
`mmrec_jax.models.mmrec.scan.linear_scan`: h [B, T, D] float32, float32 accumulation from
float32 or bfloat16 inputs, `reset[b, t]` drops the carried state before step t,
`h0` is the carried initial state. Its gradient (w.r.t. a, b and h0) is a
hand-written `jax.custom_vjp` whose backward is a second Pallas kernel.
`scan_pallas_gated.linear_scan_pallas_gated(log_a, i, z, h0, reset)` is the MM-Rec layer's scan
with its gates computed in the kernels (a = exp(log_a),
b = -expm1(log_a) * sigmoid(i) * z), so a and b never go through memory.

Layout. Channels are split as D -> (rows, lanes): the kernels see
[B, T, D/lanes, lanes] arrays, so time is a leading (untiled) dimension and
step t of a block is the whole (rows, lanes) tile `ref[t]` (one (8, 128) vreg on
TPU for float32 with the default blocks; a power-of-2 register tensor on GPU).
For D a multiple of `lanes` and T a multiple of the time block the reshape is
free; otherwise the inputs are padded (time at the end with a=1, b=0, which
leaves the earlier values unchanged; channels with zeros) and the output sliced.

Grid (batch, channel blocks, time blocks). Each program runs a sequential loop
over the time steps of its block with the state in the loop carry (registers /
vregs), manually unrolled `unroll` steps per iteration (the Triton lowering
rejects `fori_loop(unroll=...)`). Between time blocks the state lives in an
output block whose index does not move along the time axis (the final state
h_T in the forward, the state gradient in the backward), initialised under
`pl.when(program_id(2) == 0)`: the usual Pallas accumulator pattern. It needs
the time blocks of one (batch, channel block) to run in order:

- TPU (Mosaic): the grid is a sequential loop; the time axis is marked
  "arbitrary" (batch and channels "parallel") and blocks of `block_t` steps
  are pipelined HBM -> VMEM. VMEM per grid step, double-buffered: about
  2 * block_t * block_d * (2 * input bytes + 8) bytes in the backward
  (3 MiB float32 with the defaults; 6 MiB for the gated bfloat16 backward).
  The gated kernels read the per-step reset flags from SMEM.
- GPU (Triton): grid programs run concurrently, so the time axis has ONE block
  (the whole padded sequence); the refs then point into global memory and each
  step loads one (rows, lanes) row. The kernels are lowered with Triton
  (`pallas.triton.CompilerParams`): jax's default GPU lowering is Mosaic GPU,
  whose programming model (explicit SMEM, warpgroups) this kernel is not
  written for.
- CPU: Pallas interpret mode (`interpret=True`), chosen automatically.
  `target='tpu'|'gpu'` with `interpret=True` runs the TPU or GPU layout here.

Resets. The plain kernel folds them into the decay outside the kernel
(a := 0 where reset), as `linear_scan` does: inside a jitted model XLA fuses
that select into whatever produces `a`, and its autodiff masks the decay
gradient at resets. The gated kernels take a per-step keep flag (1 - reset),
since only the decay, not b, is zeroed.

Backward. With g the cotangent of h, the adjoint runs backwards in time:
  dh_t = g_t + a_{t+1} * dh_{t+1}   (dh_T := 0),
  db_t = dh_t,  da_t = dh_t * h_{t-1}  (h_{-1} = h0),  dh0 = a_0 * dh_0,
with the reset-folded a (so a reset at t=0 gives dh0 = 0). It reuses the
forward's saved h; the state before each time block (h at the last step of the
previous block, h0 for the first) is passed as a small [B, n_blocks, ...] side
input, so no shifted copy of h is made. The gated backward continues through
the gates: dlog_a = dh e^log_a (keep h_{t-1} - s z), di = dh (1 - a) z s (1 - s),
dz = dh (1 - a) s with s = sigmoid(i).

What was checked, and how (jax 0.10.2, CPU only):
- run in interpret mode (tests/test_scan_pallas.py): values and gradients equal
  `linear_scan(impl="sequential")` to 1e-5 for the cpu, tpu and gpu layouts
  (several time and channel blocks, the unrolled loops, one time block),
  float32 and bfloat16 inputs, padding in T and D, T=1, resets at t=0,
  mid-sequence and on a block boundary, h0, jit and vmap; and under the TPU
  interpreter (`interpret=pltpu.InterpretParams()`: simulated VMEM pipeline,
  uninitialised memory as NaN, SMEM blocks), one simulated core;
- lowered, not compiled: `jax.jit(...).lower(lowering_platforms=("tpu",))`
  and `("cuda",)` run the Pallas -> Mosaic and Pallas -> Triton lowerings on
  CPU for the forward and backward of both variants (float32 and bfloat16,
  D = 5, 200, 1024; T = 1, 37, 1000). That checks the block-shape rules and
  that every primitive has a lowering rule.
- NOT checked: Mosaic's and Triton's own compilation (vector layouts, register
  allocation, SMEM scalar loads, the bfloat16 (16, 128) tiles), running on a
  TPU or GPU, and any speed there. The defaults (block_t=128, block_d=1024 on
  TPU; block_d=128, 1 warp, num_stages=1 on GPU) are untuned guesses.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

_F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class _Tiling:
  """Static kernel configuration (hashable: the custom_vjp's non-diff argument)."""
  lanes: int          # minor dimension of the [B, T, D/lanes, lanes] layout
  rows: int           # channel rows per program; block_d = rows * lanes
  d_rows: int         # padded channel rows (a multiple of rows)
  block_t: int        # time steps per grid step
  t_pad: int          # padded time (a multiple of block_t)
  unroll: int         # time steps per loop iteration (divides block_t)
  target: str         # whose layout and compiler parameters: 'tpu' | 'gpu' | 'cpu'
  interpret: object   # False, True, or a pallas.tpu.InterpretParams
  dtypes: tuple       # dtype names of the sequence inputs (a, b) or (log_a, i, z)

  @property
  def n_t(self) -> int:
    return self.t_pad // self.block_t

  @property
  def n_d(self) -> int:
    return self.d_rows // self.rows


TARGETS = ("tpu", "gpu", "cpu")


def _next_pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m


def _tiling(T, D, dtypes, block_t, block_d, interpret, target) -> _Tiling:
  backend = jax.default_backend()
  if interpret is None:
    interpret = backend not in ("tpu", "gpu")
  if target is None:
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
    if isinstance(interpret, pltpu.InterpretParams):
      target = "tpu"
    else:
      target = backend if backend in TARGETS else "cpu"
  if target not in TARGETS:
    raise ValueError(f"unknown target {target!r}; use one of {TARGETS}")
  dtypes = tuple(jnp.dtype(dt).name for dt in dtypes)
  packing = 4 // min(4, *(jnp.dtype(dt).itemsize for dt in dtypes))
  if block_d is None:
    block_d = {"tpu": 1024 * packing, "gpu": 128}.get(target, 1024)
  if block_t is None:
    block_t = {"tpu": 128}.get(target, 256)

  lanes = min(128, _next_pow2(D), _next_pow2(block_d))
  if target == "tpu" and D > lanes:
    lanes = 128  # the lane dimension is 128 unless it spans the whole (padded) D
  d_rows_min = -(-D // lanes)
  rows = max(1, min(block_d // lanes, d_rows_min))
  if target == "gpu":
    rows = 1 << (rows.bit_length() - 1)  # Triton tensors have power-of-2 sizes
  if target == "tpu" and rows < d_rows_min:
    rows = max(8 * packing, rows // (8 * packing) * (8 * packing))  # sublane tiling
    rows = min(rows, d_rows_min)
  d_rows = _round_up(d_rows_min, rows)

  unroll = min(1 if target == "cpu" else 8, _next_pow2(T))
  if target == "gpu":  # programs run concurrently: one time block, the whole sequence
    block_t = _round_up(T, unroll)
  else:  # time blocks run in order on the grid
    block_t = _round_up(max(1, min(block_t, T)), unroll)
  t_pad = _round_up(T, block_t)
  return _Tiling(lanes=lanes, rows=rows, d_rows=d_rows, block_t=block_t, t_pad=t_pad,
                 unroll=unroll, target=target, interpret=interpret, dtypes=dtypes)


def _compiler_params(tl: _Tiling):
  if tl.target == "tpu":
    from jax.experimental.pallas import tpu as pltpu  # pylint: disable=g-import-not-at-top
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))
  if tl.target == "gpu" and not tl.interpret:
    from jax.experimental.pallas import triton as pltriton  # pylint: disable=g-import-not-at-top
    return pltriton.CompilerParams(num_warps=max(1, min(8, tl.rows * tl.lanes // 128)),
                                   num_stages=1)
  return None


def _time_loop(n_steps, unroll, body, carry):
  """carry = body(i, carry) for i in range(n_steps), `unroll` steps per iteration."""
  def chunk(c, carry):
    for j in range(unroll):
      carry = body(c * unroll + j, carry)
    return carry
  return jax.lax.fori_loop(0, n_steps // unroll, chunk, carry)


def _initial_carry(init_ref, carry_ref, tl: _Tiling):
  """The loop carry at the start of a time block: `init_ref` (zeros if None) in the
  first block, else what the previous block left in the resident `carry_ref`."""
  if tl.n_t == 1:  # the only layout on GPU: no round trip through memory
    return jnp.zeros(carry_ref.shape, _F32) if init_ref is None else init_ref[...]

  @pl.when(pl.program_id(2) == 0)
  def _():
    carry_ref[...] = (jnp.zeros(carry_ref.shape, _F32) if init_ref is None
                      else init_ref[...])

  return carry_ref[...]


def _fwd_kernel(a_ref, b_ref, h0_ref, h_ref, hT_ref, *, tl: _Tiling):
  """One (batch, channel block, time block): h_ref[t] = a[t] * h + b[t]."""
  h = _initial_carry(h0_ref, hT_ref, tl)

  def step(t, h):
    h = a_ref[t].astype(_F32) * h + b_ref[t].astype(_F32)
    h_ref[t] = h
    return h

  hT_ref[...] = _time_loop(tl.block_t, tl.unroll, step, h)


def _bwd_kernel(g_ref, a_ref, h_ref, hb_ref, da_ref, db_ref, dh0_ref, *, tl: _Tiling):
  """One time block, visited last to first; the carry is a_{t+1} * dh_{t+1}."""
  bt = tl.block_t
  c = _initial_carry(None, dh0_ref, tl)

  def step(i, c):
    t = bt - 1 - i  # t >= 1 here: step 0 needs the state before the block
    dh = g_ref[t] + c
    db_ref[t] = dh.astype(db_ref.dtype)
    da_ref[t] = (dh * h_ref[t - 1]).astype(da_ref.dtype)
    return a_ref[t].astype(_F32) * dh

  if bt > 1:
    unroll = math.gcd(tl.unroll, bt - 1)
    c = _time_loop(bt - 1, unroll, step, c)
  dh = g_ref[0] + c
  db_ref[0] = dh.astype(db_ref.dtype)
  da_ref[0] = (dh * hb_ref[...]).astype(da_ref.dtype)
  dh0_ref[...] = a_ref[0].astype(_F32) * dh


def _specs(tl: _Tiling, reverse: bool):
  n_t = tl.n_t
  tb = (lambda t: n_t - 1 - t) if reverse else (lambda t: t)
  seq = pl.BlockSpec((None, tl.block_t, tl.rows, tl.lanes), lambda b, d, t: (b, tb(t), d, 0))
  state = pl.BlockSpec((None, tl.rows, tl.lanes), lambda b, d, t: (b, d, 0))
  per_block = pl.BlockSpec((None, None, tl.rows, tl.lanes), lambda b, d, t: (b, tb(t), d, 0))
  return seq, state, per_block


def _fwd_call(a4, b4, h03, tl: _Tiling):
  B = a4.shape[0]
  seq, state, _ = _specs(tl, reverse=False)
  return pl.pallas_call(
      functools.partial(_fwd_kernel, tl=tl),
      grid=(B, tl.n_d, tl.n_t),
      in_specs=[seq, seq, state],
      out_specs=[seq, state],
      out_shape=[jax.ShapeDtypeStruct(a4.shape, _F32), jax.ShapeDtypeStruct(h03.shape, _F32)],
      interpret=tl.interpret,
      compiler_params=_compiler_params(tl),
      name="linear_scan_fwd",
  )(a4, b4, h03)


def _bwd_call(g4, a4, h4, hb4, tl: _Tiling):
  B = a4.shape[0]
  seq, state, per_block = _specs(tl, reverse=True)
  return pl.pallas_call(
      functools.partial(_bwd_kernel, tl=tl),
      grid=(B, tl.n_d, tl.n_t),
      in_specs=[seq, seq, seq, per_block],
      out_specs=[seq, seq, state],
      out_shape=[jax.ShapeDtypeStruct(a4.shape, tl.dtypes[0]),
                 jax.ShapeDtypeStruct(a4.shape, tl.dtypes[1]),
                 jax.ShapeDtypeStruct((B, tl.d_rows, tl.lanes), _F32)],
      interpret=tl.interpret,
      compiler_params=_compiler_params(tl),
      name="linear_scan_bwd",
  )(g4, a4, h4, hb4)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _scan(a4, b4, h03, tl):
  return _fwd_call(a4, b4, h03, tl)[0]


def _scan_fwd(a4, b4, h03, tl):
  h4, _ = _fwd_call(a4, b4, h03, tl)
  return h4, (a4, h4, h03)


def _scan_bwd(tl, res, g4):
  a4, h4, h03 = res
  # the state before each time block: h0, then h at each block's last step
  hb4 = jnp.concatenate([h03[:, None], h4[:, tl.block_t - 1::tl.block_t][:, :tl.n_t - 1]],
                        axis=1)
  da4, db4, dh03 = _bwd_call(g4.astype(_F32), a4, h4, hb4, tl)
  return da4, db4, dh03


_scan.defvjp(_scan_fwd, _scan_bwd)


def linear_scan_pallas(a_BTD, b_BTD, h0_BD=None, reset_BT=None, *, block_t=None, block_d=None,
                       interpret=None, target=None):
  """Returns h [B, T, D] float32 with h_t = a_t * h_{t-1} + b_t, h_{-1} = h0.

  The same values and gradients as `mmrec_jax.models.mmrec.scan.linear_scan` (up to float32
  rounding), computed by Pallas kernels (see the module docstring).

  Args:
    a_BTD: decays, float32 or bfloat16 (read in that dtype, float32 inside).
    b_BTD: inputs, float32 or bfloat16.
    h0_BD: the carried state (zeros if None).
    reset_BT: bool, True where the carried state is dropped before step t.
    block_t: time steps per grid step (default 128 on TPU, 256 on CPU).
      Ignored on GPU, where one program runs the whole sequence. Rounded up to
      the unroll factor (8 on TPU and GPU); T is padded to a multiple.
    block_d: channels per program (default 1024 on TPU, 2048 with bfloat16
      inputs; 128 on GPU; 1024 on CPU). On TPU it is rounded to a multiple of
      1024 (2048 for bfloat16) or to all of D; on GPU down to a power of 2.
    interpret: run in Pallas interpret mode (default: when the backend is
      neither TPU nor GPU, i.e. on CPU). A `pallas.tpu.InterpretParams` runs
      the TPU interpreter instead (simulated VMEM pipeline, uninitialized
      memory as NaN), with the TPU layout and compiler parameters.
    target: whose layout, block defaults and compiler parameters to use:
      'tpu' (time blocks on the grid, in order), 'gpu' (one time block, Triton)
      or 'cpu' (like 'tpu', no unroll). Default: the backend's ('tpu' with a
      TPU InterpretParams). With interpret mode, this is how the TPU and GPU
      layouts are tested on CPU.
  """
  a_BTD, b_BTD = _check_inputs(a=a_BTD, b=b_BTD)
  B, T, D = a_BTD.shape
  tl = _tiling(T, D, (a_BTD.dtype, b_BTD.dtype), block_t, block_d, interpret, target)
  if reset_BT is not None:
    a_BTD = jnp.where(reset_BT[:, :, None], jnp.zeros((), a_BTD.dtype), a_BTD)
  h4 = _scan(_to_blocks(a_BTD, tl, 1), _to_blocks(b_BTD, tl, 0), _state_to_blocks(h0_BD, B, tl), tl)
  return _from_blocks(h4, T, D)


def _check_inputs(**arrays):
  shape = None
  for name, x in arrays.items():
    if jnp.result_type(x) not in (jnp.float32, jnp.bfloat16):
      raise ValueError(f"linear_scan_pallas: {name} must be float32 or bfloat16, "
                       f"got {jnp.result_type(x)}")
    if x.ndim != 3 or (shape is not None and x.shape != shape):
      raise ValueError(f"linear_scan_pallas: {name} has shape {x.shape}, want [B, T, D] "
                       f"equal for all inputs")
    shape = x.shape
  return [jnp.asarray(x) for x in arrays.values()]


def _to_blocks(x_BTD, tl: _Tiling, t_fill):
  """[B, T, D] -> [B, t_pad, d_rows, lanes]: time padded with `t_fill`, channels with 0."""
  B, T, D = x_BTD.shape
  tp, dp = tl.t_pad - T, tl.d_rows * tl.lanes - D
  if dp:
    x_BTD = jnp.pad(x_BTD, ((0, 0), (0, 0), (0, dp)))
  if tp:
    x_BTD = jnp.pad(x_BTD, ((0, 0), (0, tp), (0, 0)), constant_values=t_fill)
  return x_BTD.reshape(B, tl.t_pad, tl.d_rows, tl.lanes)


def _state_to_blocks(h0_BD, B, tl: _Tiling):
  D_pad = tl.d_rows * tl.lanes
  if h0_BD is None:
    return jnp.zeros((B, tl.d_rows, tl.lanes), _F32)
  h0_BD = h0_BD.astype(_F32)
  return jnp.pad(h0_BD, ((0, 0), (0, D_pad - h0_BD.shape[1]))).reshape(B, tl.d_rows, tl.lanes)


def _from_blocks(h4, T, D):
  B, t_pad, d_rows, lanes = h4.shape
  return h4.reshape(B, t_pad, d_rows * lanes)[:, :T, :D]


# --- The fused variant: the gates of the MM-Rec layer computed inside the kernel ---
