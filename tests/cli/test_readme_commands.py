"""Every command the README shows, and every command an earlier README showed, still
parses: its module exists, its flags exist, its config files resolve and its
`--config.SECTION.FIELD` overrides name real fields (nothing is trained)."""
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

from tests import support

# Commands earlier versions of the README gave (the recall benchmark of then took other
# flags; its write-up names the commit that ran them).
PREVIOUS = [
    "python -m mmrec_jax.train --config=configs/tiny.py",
    "python -m mmrec_jax.train --config=configs/tiny.py --workdir=runs/tiny --config.train.steps=2000",
    "python -m mmrec_jax.train --config=configs/mini.py --workdir=runs/mini --config.train.warmup_steps=30",
    "python -m mmrec_jax.params --config=configs/tiny.py",
    "python -m mmrec_jax.tokenizer --extend=runs/tiny/tokenizer.json --config=configs/mini.py --out=runs/mini_tokenizer.json",
    "python -m mmrec_jax.launch.local --processes=2 --devices_per_process=4 -- --config=configs/tiny.py --workdir=runs/mh --config.mesh.dcn_data=2 --config.mesh.fsdp=4 --config.mesh.data=1 --config.train.batch_size=8",
    "python -m mmrec_jax.plan --config=configs/7b.py --devices=32 --mesh=data:1,fsdp:32,tensor:1 --device_kind=v5p --n_layers=2 --config.model.remat=full --config.train.grad_accum=16 --seq_len=2048 --batch_size=512",
    "python -m mmrec_jax.plan --config=configs/7b.py --devices=64 --mesh=data:1,fsdp:64,tensor:1 --device_kind=v5p,H100 --n_layers=2",
    "python -m mmrec_jax.generate --workdir=runs/tiny --prompt=def --max_new_tokens=200 --temperature=0.8 --top_k=40 --top_p=0.95 --seed=0",
    "python -m mmrec_jax.evaluate --workdir=runs/tiny --data=PATH --json",
    "python -m mmrec_jax.evaluate --workdir=runs/tiny --long_context=4",
    "python -m mmrec_jax.export --workdir=runs/tiny --out=runs/exported/tiny",
    "python -m mmrec_jax.grow --from_workdir=runs/tiny --config=configs/mini.py --workdir=runs/mini",
    "python -m mmrec_jax.progressive --workdir=runs/ladder --steps=600,1000,2000",
    "python -m mmrec_jax.bench.quality --tokens=1000000 --seq_len=1024 --seeds=0,1 --out=runs/quality",
    "python -m mmrec_jax.bench.quality --tokens=1000000 --seq_len=1024 --seeds=0,1 --arms=mmrec_v0,mmrec_nomem,mmrec_zr,mmrec_sink --carry_state --out=runs/quality",
    "python -m mmrec_jax.bench.grow --steps=300 --seeds=0,1 --eval_every=30 --set=train.seq_len=128 --set=train.batch_size=8 --set=train.eval_batches=8 --set=model.mem_out_init=1 --set=model.mem_lr_scale=1 --workdir=runs/bench_grow",
    "python -m mmrec_jax.bench.recall --out=runs/recall",
    "python -m mmrec_jax.bench.train --config=configs/tiny.py --steps=7",
    "python -m mmrec_jax.bench.profile --config=configs/tiny.py --steps=3",
    "python -m mmrec_jax.bench.data --config=configs/tiny.py",
    "python -m mmrec_jax.bench.decode --configs=tiny",
    "python -m mmrec_jax.bench.scan --sizes=tiny --repeats=3",
]

# A child process that runs a module as `python -m` does, but whose `cli.run` parses
# each of the given flag lists (config files resolved, overrides checked) in a fork of
# itself (the module imported once, its flags fresh for every list), printing
# "parsed I" for the I-th that parses, and never runs `main`.
CHILD = r"""
import json, os, runpy, sys
from mmrec_jax import cli
def parse_each(main):
  for i, args in enumerate(json.loads(sys.argv[1])):
    pid = os.fork()
    if pid == 0:
      args = args[:args.index("--")] if "--" in args else args   # launch.local's own
      sys.argv = [module, *args]   # config_flags reads its overrides from sys.argv
      cli.parse_flags(sys.argv)
      print("parsed", i, flush=True)
      os._exit(0)
    os.waitpid(pid, 0)
  sys.exit(0)
cli.run = parse_each
module = sys.argv[1]
sys.argv = [module, sys.argv[2]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def readme_commands():
  text = open(os.path.join(support.REPO, "README.md")).read().replace("\\\n", " ")
  out = []
  for m in re.finditer(r"python -m (mmrec_jax[\w.]*)([^\n`]*)", text):
    args = re.sub(r"\[[^\]]*\]", " ", m.group(2))
    if "..." in args or "CONFIG" in args or not args.strip():  # a name in prose
      continue
    out.append(f"python -m {m.group(1)} {' '.join(args.split())}".strip())
  return sorted(set(out))


def by_module(commands):
  """{module: [command, ...]}: one child process parses every command of a module."""
  out = {}
  for cmd in commands:
    words = shlex.split(cmd)
    assert words[:2] == ["python", "-m"], cmd
    out.setdefault(words[2], []).append(cmd)
    if "--" in words:   # launch.local: what follows `--` is the train command's
      out.setdefault("mmrec_jax.train", []).append(
          " ".join(["python", "-m", "mmrec_jax.train", *words[words.index("--") + 1:]]))
  return out


def parse_all(module, commands):
  """For each command: (did it parse, what the child printed to stderr)."""
  argvs = [shlex.split(c)[3:] for c in commands]
  r = subprocess.run([sys.executable, "-c", CHILD, module, json.dumps(argvs)],
                     capture_output=True, text=True, env=support.one_device_env(),
                     cwd=support.REPO, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  return ["parsed" if f"parsed {i}" in r.stdout.split("\n") else r.stderr
          for i in range(len(commands))]


COMMANDS = by_module(set(readme_commands()) | set(PREVIOUS))


@pytest.mark.slow
@pytest.mark.parametrize("module", sorted(COMMANDS))
def test_the_commands_parse(module):
  for cmd, outcome in zip(COMMANDS[module], parse_all(module, COMMANDS[module])):
    assert outcome == "parsed", f"{cmd}\n{outcome[-2000:]}"


def test_the_readme_shows_the_commands_a_user_needs():
  shown = {c.split()[2] for c in readme_commands()}
  for module in ("mmrec_jax.train", "mmrec_jax.generate", "mmrec_jax.evaluate",
                 "mmrec_jax.export", "mmrec_jax.grow", "mmrec_jax.progressive",
                 "mmrec_jax.params", "mmrec_jax.plan", "mmrec_jax.launch.local"):
    assert module in shown, module
