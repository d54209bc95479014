"""Inference and evaluation: load, sampling, generate, evaluate, export, CLIs."""
import contextlib
import io
import json
import os
import re
import random
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from mmrec_jax import checkpoint as ckpt_lib
from mmrec_jax import config as config_lib
from mmrec_jax import data
from mmrec_jax import evaluate as eval_lib
from mmrec_jax import export as export_lib
from mmrec_jax import generate as gen_lib
from mmrec_jax import loading as load_lib
from mmrec_jax import models
from mmrec_jax import sampling
from mmrec_jax import tokenizer as tok_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = ("def main return for while class import self print value list dict None True "
         "False if else with open read write data").split()

# The README example, as written there ("runs/tiny" is replaced by the fixture's workdir).
README_EXAMPLE = re.search(
    r"\*\*Research API\*\*.*?```python\n(.*?)```",
    open(os.path.join(REPO, "README.md")).read(), re.S).group(1)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  """A run directory: config.json, tokenizer.json, checkpoints 1 (best) and 2 (latest)."""
  root = tmp_path_factory.mktemp("inference")
  rnd = random.Random(0)
  docs = [" ".join(rnd.choice(WORDS) for _ in range(rnd.choice([20, 60, 200])))
          for _ in range(40)]
  (root / "corpus.txt").write_text("\n\n".join(docs) + "\n")
  c = config_lib.load_config_file(os.path.join(REPO, "configs", "tiny.py"))
  c.model.update(vocab_size=300, d_model=32, n_layers=2, n_heads=2, chunk_size=8,
                 mem_slots=2, mem_levels=2, mem_out_init=1.0)   # the memory read from the start
  c.train.seq_len = 32
  c.data.path = str(root / "corpus.txt")
  c.data.val_fraction = 0.2
  wd = str(root / "run")
  data.get_tokenizer(c, wd)   # the run directory needs its tokenizer
  model = models.build(c.model)
  mngr = ckpt_lib.make_manager(wd, keep=2, async_save=False)
  for step, val_loss in ((1, 2.0), (2, 3.0)):
    params = jax.tree.map(lambda x: x * 2.0,  # less uniform logits: varied greedy tokens
                          nn.unbox(models.init_params(model, jax.random.key(step))))
    ckpt_lib.save(mngr, step, params, {"count": np.zeros((), np.int32)},
                  jax.random.key_data(jax.random.key(0)), {}, val_loss=val_loss)
  mngr.wait_until_finished()
  mngr.close()
  ckpt_lib.save_run_config(wd, c)
  return wd


@pytest.fixture(scope="module")
def loaded(workdir):
  model, variables, tok, config = load_lib.load(workdir, "best")
  return model, variables, tok, config, sampling.Decoder(model)


def _cli(*args, stdin=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True,
                        cwd=REPO, env=env, input=stdin, timeout=120, check=False)


def test_load_selects_checkpoint(workdir, loaded):
  _, variables, tok, config, _ = loaded
  assert config.loaded_step == 1 and config.model.d_model == 32
  assert tok.token_to_id("<|eod|>") == 0
  _, v2, _, c2 = load_lib.load(workdir, "latest")
  assert c2.loaded_step == 2
  assert not np.array_equal(v2["params"]["embed"], variables["params"]["embed"])
  assert load_lib.load(workdir, 2)[3].loaded_step == 2
  with pytest.raises(load_lib.LoadError, match="not in saved steps"):
    load_lib.load(workdir, 7)


def test_readme_example(workdir, loaded):
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    exec(README_EXAMPLE.replace("runs/tiny", workdir), {})  # pylint: disable=exec-used
  model, variables, tok, _, dec = loaded
  ids = dec.generate(variables, [tok.encode("def main(").ids], 8, temperature=0)[0]
  assert len(ids) == 8  # (no <|eod|> in the first 8 greedy tokens of this model)
  assert out.getvalue() == "".join(tok.decode([i]) for i in ids)


def test_generation_is_deterministic_for_a_seed(loaded):
  model, variables, tok, _, dec = loaded
  run = lambda seed: gen_lib.generate(model, variables, tok, ["def main(", "x = "], 24, 1.0,
                                      top_k=50, top_p=0.9, seed=seed, decoder=dec)
  a, b, c = run(0), run(0), run(1)
  assert a == b and a != c
  assert all(a)


def test_greedy_equals_argmax_of_full_pass(loaded):
  model, variables, tok, _, dec = loaded
  prompt = tok.encode("for value in list").ids
  new = dec.generate(variables, [prompt], 30, temperature=0)[0]
  streamed = []
  same = dec.generate(variables, [prompt], 30, temperature=0,
                      on_tokens=lambda t, d: streamed.append(int(t[0])))[0]
  assert same == new and streamed[:len(new)] == new
  assert len(new) >= 20 and len(set(new)) > 5   # crosses several memory chunks (size 8)
  seq = jnp.array([[0] + prompt + new])
  logits, _, _ = jax.jit(model.apply)(variables, seq)
  want = np.asarray(jnp.argmax(logits[0], -1))[len(prompt):len(prompt) + len(new)]
  np.testing.assert_array_equal(want, new)


def test_sampled_loop_equals_streamed_steps(loaded):
  # The loop draws its sampling noise a block of steps at a time, the streamed
  # path one step at a time: the same tokens, past the first block too.
  _, variables, tok, _, dec = loaded
  prompt = tok.encode("def main(").ids
  kw = dict(temperature=1.0, top_k=20, top_p=0.9, seed=5)
  loop = dec.generate(variables, [prompt], 40, **kw)[0]
  streamed = dec.generate(variables, [prompt], 40, on_tokens=lambda t, d: None, **kw)[0]
  assert loop == streamed
  assert len(loop) > dec.NOISE_BLOCK


@pytest.mark.slow
def test_batch_decode_equals_single_decode(loaded):
  _, variables, tok, _, dec = loaded
  texts = ["if", "def main(self, value", "import data " * 6]   # 1, ~7, ~24 tokens
  prompts = [tok.encode(t).ids for t in texts]
  batch = dec.generate(variables, prompts, 20, temperature=0)
  single = [dec.generate(variables, [p], 20, temperature=0, pad_multiple=1)[0] for p in prompts]
  assert batch == single
  # Sampling: row r draws with fold_in(key, r), so row 0 matches the prompt alone.
  b = dec.generate(variables, prompts, 20, temperature=1.0, top_k=20, seed=3)
  s = dec.generate(variables, prompts[:1], 20, temperature=1.0, top_k=20, seed=3, pad_multiple=1)
  assert b[0] == s[0]


def test_sample_logits_filters():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]] * 4000))
  key = jax.random.key(0)
  top2 = np.asarray(sampling.sample_logits(key, logits, 1.0, 2, 1.0))
  assert set(top2.tolist()) == {0, 1} and abs(np.mean(top2 == 0) - 0.625) < 0.03
  nucleus = np.asarray(sampling.sample_logits(key, logits, 1.0, 0, 0.6))
  assert set(nucleus.tolist()) == {0, 1}
  assert set(np.asarray(sampling.sample_logits(key, logits, 1.0, 0, 1.0)).tolist()) == {0, 1, 2, 3}
  assert np.all(np.asarray(sampling.sample_logits(key, logits, 0.0, 0, 1.0)) == 0)


def test_evaluate_matches_direct_computation(loaded):
  model, variables, tok, config, _ = loaded
  tokens = eval_lib.eval_tokens(config, tok)
  batches = eval_lib.make_batches(tokens, tok, 32, batch_size=4)
  res = eval_lib.evaluate(model, variables, batches)
  nll, correct, n, n_bytes = 0.0, 0, 0, 0
  toks = np.asarray(tokens, np.int64)
  apply = jax.jit(model.apply)
  for start in range(0, len(toks) - 1, 32):        # windows, each from a fresh state
    w = toks[start:start + 33]
    x, y = w[:-1], w[1:]
    x_1T = np.pad(x, (0, 32 - len(x)), constant_values=1)[None]
    logits, _, _ = apply(variables, jnp.asarray(x_1T, jnp.int32), reset=x_1T == 0)
    lg = np.asarray(logits[0, :len(y)], np.float64)
    lp = lg - lg.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    nll -= lp[np.arange(len(y)), y].sum()
    correct += int((lg.argmax(-1) == y).sum())
    n += len(y)
    n_bytes += sum(len(tok_lib.token_bytes(tok, int(t))) for t in y)
  assert res["tokens"] == n == len(toks) - 1
  np.testing.assert_allclose(res["loss"], nll / n, rtol=1e-5)
  np.testing.assert_allclose(res["perplexity"], np.exp(nll / n), rtol=1e-5)
  np.testing.assert_allclose(res["bits_per_byte"], nll / np.log(2) / n_bytes, rtol=1e-5)
  assert res["token_accuracy"] == correct / n


def test_loss_by_position_streams_like_one_pass(loaded, tmp_path):
  model, variables, tok, config, _ = loaded
  tokens = eval_lib.eval_tokens(config, tok)
  sums, counts = eval_lib.loss_by_position(model, variables, tokens, 0, 1, 16, 4, batch_size=2,
                                           max_docs=3)
  x, y, m = eval_lib.long_windows(tokens, 0, 1, 64, max_docs=3)
  logits, _, _ = jax.jit(model.apply)(variables, jnp.asarray(x), reset=jnp.asarray(x == 0))
  nll = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), y[..., None], -1)[..., 0]
  np.testing.assert_allclose(sums, (nll * m).sum(0), rtol=2e-5)
  np.testing.assert_array_equal(counts, m.sum(0))
  assert counts[0] == 3 and counts[-1] >= 1
  rows = eval_lib.bucket_table(sums, counts, 8)
  tsv, png = eval_lib.write_loss_by_position(str(tmp_path), rows, 16)
  assert open(tsv).read().count("\n") == len(rows) + 1 and os.path.getsize(png) > 0


@pytest.mark.slow
def test_export_round_trip(workdir, loaded, tmp_path):
  model, variables, _, _, _ = loaded
  out = str(tmp_path / "exported")
  export_lib.export(workdir, out, "best")
  model2, v2, tok2, c2 = load_lib.load(out)
  assert c2.loaded_step == 1 and tok2.get_vocab_size() == 300
  x = jnp.array([[0, 5, 9, 42, 7, 0, 3]])
  reset = x == 0
  np.testing.assert_array_equal(model.apply(variables, x, reset=reset)[0],
                                model2.apply(v2, x, reset=reset)[0])
  with pytest.raises(load_lib.LoadError, match="--force"):
    export_lib.export(workdir, out, "latest")
  export_lib.export(workdir, out, "latest", force=True)
  assert load_lib.load(out)[3].loaded_step == 2
  assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]   # no temp dirs left
  code = ("import json, sys; from safetensors.numpy import load_file; "
          f"w = load_file({out + '/model.safetensors'!r}); "
          f"c = json.load(open({out + '/config.json'!r})); "
          "assert w['embed'].shape == (c['model']['vocab_size'], c['model']['d_model']); "
          "assert c['tokenizer']['eod_id'] == 0 and 'jax' not in sys.modules; print(len(w))")
  r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
  assert r.returncode == 0, r.stderr
  assert int(r.stdout) == len(load_lib.flatten(v2["params"]))


def test_generate_cli_streams_greedy(workdir, loaded):
  _, variables, tok, _, dec = loaded
  r = _cli("mmrec_jax.generate", f"--workdir={workdir}", "--prompt=-", "--max_new_tokens=12",
           "--temperature=0", stdin="def main(")
  assert r.returncode == 0, r.stderr
  new = dec.generate(variables, [tok.encode("def main(").ids], 12, temperature=0)[0]
  want = "def main(" + gen_lib.decode_bytes(tok, new).decode("utf-8", errors="replace") + "\n"
  assert r.stdout == want


def test_evaluate_cli_json(workdir, loaded):
  model, variables, tok, config, _ = loaded
  r = _cli("mmrec_jax.evaluate", f"--workdir={workdir}", "--json", "--batch_size=4")
  assert r.returncode == 0, r.stderr
  got = json.loads(r.stdout.strip().splitlines()[-1])
  assert set(got) == {"loss", "perplexity", "bits_per_byte", "token_accuracy", "tokens"}
  want = eval_lib.evaluate(model, variables, eval_lib.make_batches(
      eval_lib.eval_tokens(config, tok), tok, 32, batch_size=4))
  np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-6)
  assert got["tokens"] == want["tokens"]


@pytest.mark.parametrize("args, match", [
    (("mmrec_jax.generate", "--workdir={missing}", "--prompt=a"), "not a directory"),
    (("mmrec_jax.generate", "--workdir={bad}", "--prompt=a"), "incompatible model"),
    (("mmrec_jax.generate", "--workdir={wd}", "--prompt="), "empty"),
    (("mmrec_jax.generate", "--workdir={wd}", "--prompt=a", "--max_new_tokens=0"),
     "max_new_tokens"),
    (("mmrec_jax.generate", "--workdir={wd}", "--prompt=a", "--temperature=-1"), "temperature"),
    (("mmrec_jax.generate", "--workdir={wd}", "--prompt=a", "--top_p=1.5"), "top_p"),
    (("mmrec_jax.generate", "--workdir={wd}", "--prompt=a", "--top_k=-2"), "top_k"),
    (("mmrec_jax.evaluate", "--workdir={wd}", "--data={short}"), "fewer than one window"),
])
def test_bad_input_cli(workdir, tmp_path, args, match):
  bad = tmp_path / "bad"
  shutil.copytree(workdir, bad)
  cfg = json.loads((bad / "config.json").read_text())
  cfg["model"]["d_model"] = 64
  (bad / "config.json").write_text(json.dumps(cfg))
  (tmp_path / "short.txt").write_text("tiny text\n")
  fmt = dict(wd=workdir, bad=bad, missing=tmp_path / "nope", short=tmp_path / "short.txt")
  r = _cli(*[a.format(**fmt) for a in args])
  assert r.returncode == 2, (r.stdout, r.stderr)
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], r.stderr
  assert "Traceback" not in r.stderr
