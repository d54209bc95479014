"""What the data tests share: small documents, a text corpus, a small config."""
import random

from mmrec_jax import config as config_lib

VOCAB = 300
SEQ = 32


def _words(rng, n):
  letters = "abcdefghijklmnopqrstuvwxyz"
  return " ".join("".join(rng.choice(letters[:12]) for _ in range(rng.randint(2, 7)))
                  for _ in range(n))


def docs(n=60, seed=0):
  rng = random.Random(seed)
  return [f"doc {i}: " + _words(rng, 40) + " ünï €." for i in range(n)]


def write_txt(path, documents):
  path.write_text("\n\n".join(documents) + "\n", encoding="utf-8")
  return str(path)


def cfg(path, val_fraction=0.2, **data_fields):
  """A small config reading `path`: windows of SEQ tokens, batches of 4."""
  c = config_lib.make_config("t", vocab_size=VOCAB, d_model=32, n_layers=1, n_heads=1,
                             max_seq_len=64)
  c.train.seq_len = SEQ   # the ConfigDict a config file returns: within max_seq_len
  return config_lib.typed(c).override({"train.batch_size": 4, "data.path": path,
                                       "data.val_fraction": val_fraction,
                                       **{f"data.{k}": v for k, v in data_fields.items()}})
