"""Train or extend a run's tokenizer: `python -m mmrec_jax.tokenizer --config=configs/mini.py`.

    python -m mmrec_jax.tokenizer --extend=runs/tiny/tokenizer.json \
        --config=configs/mini.py --out=runs/mini_tokenizer.json

`--extend` keeps every old id's meaning (what progressive growth needs).
"""
from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from mmrec_jax import cli as cli_lib
from mmrec_jax.data.tokenizer import (check_tokenizer, extend_tokenizer, load_extend,
                                      save_tokenizer, train_tokenizer)

def main(argv):
  del argv
  from mmrec_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  from mmrec_jax.data import sources as sources  # pylint: disable=g-import-not-at-top
  cfg = config_lib.validate(flags.FLAGS.config)
  d = cfg.data
  old = load_extend(flags.FLAGS.extend, cfg.model.vocab_size) if flags.FLAGS.extend else None
  texts = (t for _, t in sources.split_documents(d, "train", d.tokenizer_max_bytes))
  if old is not None:
    tok = extend_tokenizer(old, texts, cfg.model.vocab_size)
  else:
    tok = train_tokenizer(texts, cfg.model.vocab_size)
  check_tokenizer(tok, cfg.model.vocab_size, flags.FLAGS.out)
  save_tokenizer(tok, flags.FLAGS.out)
  print(f"wrote {flags.FLAGS.out}: {tok.get_vocab_size()} tokens")


def entry():
  config_flags.DEFINE_config_file("config", None, cli_lib.config_help("mmrec_jax.train"),
                                  lock_config=False)
  flags.mark_flag_as_required("config")
  flags.DEFINE_string("extend", "", "tokenizer.json to extend (old ids keep their meaning)")
  flags.DEFINE_string("out", "tokenizer.json", "output tokenizer.json")
  cli_lib.run(main)


if __name__ == "__main__":
  entry()
