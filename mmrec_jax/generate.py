"""Text generation from a trained model.

    python -m mmrec_jax.generate --workdir=runs/tiny --prompt="def main(" \\
        --max_new_tokens=200 --temperature=0.8 --top_k=40 --top_p=0.95 --seed=0

Prompts: `--prompt` (repeat it for a batch; `--prompt=-` reads standard input)
or `--prompt_file` (a `.jsonl` file holds one prompt per line, as a JSON string
or an object with a "prompt" field; any other file is one prompt). One prompt
streams its continuation; several are decoded as one batch and printed at the
end. Generation stops at `<|eod|>` or after `--max_new_tokens`. Ctrl-C stops
cleanly (during loading or compiling too): the text streamed so far stays on
stdout and the exit status is 130; a second Ctrl-C quits at once.
"""
from __future__ import annotations

import codecs
import json
import os
import sys

from absl import flags

from mmrec_jax import cli as cli_lib
from mmrec_jax.errors import UsageError


def as_text(s, where):
  """`s` with any byte that is not UTF-8 replaced by U+FFFD (a warning says so):
  command-line arguments arrive with such bytes as surrogates."""
  fixed = s.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
  if fixed != s:
    print(f"warning: {where} is not valid UTF-8; its invalid bytes were replaced by U+FFFD",
          file=sys.stderr, flush=True)
  return fixed


def read_prompts(prompts, prompt_file=None, stdin=None):
  """The prompt strings of the flags (UsageError if none or one is empty)."""
  out = []
  for i, p in enumerate(prompts or ()):
    if p == "-":
      raw = getattr(stdin or sys.stdin, "buffer", None)
      text = (raw.read().decode("utf-8", "surrogateescape") if raw is not None
              else (stdin or sys.stdin).read())
      out.append(as_text(text, "standard input"))
    else:
      out.append(as_text(p, f"--prompt number {i + 1}"))
  if prompt_file:
    if not os.path.isfile(prompt_file):
      raise UsageError(f"prompt file {prompt_file!r} not found")
    with open(prompt_file, encoding="utf-8", errors="replace") as f:
      if prompt_file.endswith(".jsonl"):
        for n, line in enumerate(f, 1):
          if line.strip():
            try:
              v = json.loads(line)
            except json.JSONDecodeError:
              raise UsageError(f"{prompt_file}:{n}: not valid JSON") from None
            out.append(v["prompt"] if isinstance(v, dict) and "prompt" in v else v)
      else:
        out.append(f.read())
  if not out:
    raise UsageError("no prompt; pass --prompt=TEXT (repeatable), --prompt=- or --prompt_file")
  for i, p in enumerate(out):
    if not isinstance(p, str) or not p:
      raise UsageError(f"prompt {i + 1} is empty (or not a string); give some text to continue")
  return out


def encode(tok, text):
  """Token ids of `text`; special-token strings in it are plain text."""
  old = tok.encode_special_tokens
  tok.encode_special_tokens = True
  try:
    return tok.encode(text, add_special_tokens=False).ids
  finally:
    tok.encode_special_tokens = old


def decode_bytes(tok, ids):
  from mmrec_jax.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  return b"".join(tok_lib.token_bytes(tok, int(i)) for i in ids)


def generate(model, variables, tok, prompts, max_new_tokens=200, temperature=0.8, top_k=0,
             top_p=1.0, seed=0, stream=None, decoder=None, stop=None):
  """Continuations (str) of `prompts` (str); with `stream` (a text file) and one
  prompt, the text is written to it as it comes. `stop`: a `cli.StopRequest`
  checked before each streamed token (errors.Interrupted once it is set)."""
  from mmrec_jax.inference import sampling as sampling  # pylint: disable=g-import-not-at-top
  from mmrec_jax.data import tokenizer as tok_lib  # pylint: disable=g-import-not-at-top
  dec = decoder or sampling.Decoder(model, tok.token_to_id(tok_lib.EOD),
                                    tok.token_to_id(tok_lib.PAD))
  ids = [encode(tok, p) for p in prompts]
  on_tokens = None
  if stream is not None and len(prompts) == 1:
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def on_tokens(tok_B, done_B):
      del done_B  # after <|eod|> come <|pad|> tokens: no bytes
      if stop is not None and stop.requested:
        stream.write(utf8.decode(b"", final=True) + "\n")
        stream.flush()
        stop.check("interrupted (the text so far is above)")
      stream.write(utf8.decode(decode_bytes(tok, tok_B[:1])))
      stream.flush()
  new = dec.generate(variables, ids, max_new_tokens, temperature, top_k, top_p, seed,
                     on_tokens=on_tokens)
  if stop is not None and on_tokens is None:
    stop.check()
  if on_tokens is not None:  # an incomplete UTF-8 sequence at the end becomes U+FFFD
    stream.write(utf8.decode(b"", final=True))
    stream.flush()
  return [decode_bytes(tok, n).decode("utf-8", errors="replace") for n in new]


def main(argv):
  del argv
  from mmrec_jax.io import loading as load_lib  # pylint: disable=g-import-not-at-top
  from mmrec_jax.inference import sampling as sampling  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  with cli_lib.deferred_sigint() as stop:
    sampling.check_settings(f.max_new_tokens, f.temperature, f.top_k, f.top_p)
    prompts = read_prompts(f.prompt, f.prompt_file)
    model, variables, tok, _ = load_lib.load(f.workdir, f.checkpoint)
    stop.check()
    if len(prompts) == 1:
      sys.stdout.write(prompts[0])
      sys.stdout.flush()
      generate(model, variables, tok, prompts, f.max_new_tokens, f.temperature, f.top_k,
               f.top_p, f.seed, stream=sys.stdout, stop=stop)
      sys.stdout.write("\n")
    else:
      outs = generate(model, variables, tok, prompts, f.max_new_tokens, f.temperature, f.top_k,
                      f.top_p, f.seed, stop=stop)
      for i, (p, o) in enumerate(zip(prompts, outs)):
        print(f"=== [{i}] ===\n{p}{o}")


def entry():
  flags.DEFINE_string("workdir", None, "Training workdir or exported folder.")
  flags.DEFINE_string("checkpoint", "best", "best | latest | STEP (workdirs only).")
  flags.DEFINE_multi_string("prompt", [], "Prompt text (repeatable); '-' reads stdin.")
  flags.DEFINE_string("prompt_file", None, "File with one prompt (.jsonl: one per line).")
  flags.DEFINE_integer("max_new_tokens", 200, "New tokens per prompt at most.")
  flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 is greedy.")
  flags.DEFINE_integer("top_k", 0, "Keep the k most likely tokens (0: all).")
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1] (1: off).")
  flags.DEFINE_integer("seed", 0, "Random seed.")
  flags.mark_flag_as_required("workdir")
  cli_lib.run(main)


if __name__ == "__main__":
  entry()
