"""Recall: can a model find, far back in its context, what a later query asks for?

    python -m mmrec_jax.bench.recall [--arms=mmrec,mmrec_nomem,transformer] [--seeds=0,1]
        [--lrs=3e-3] [--steps=1000] [--seq_len=128] [--out=runs/recall] [--json]

Synthetic tasks with a small vocabulary and fresh random bindings in every
sequence (`mmrec_jax/data/tasks.py`), trained through the normal trainer with the
loss on the answers only (`data.task`, `mmrec_jax/data/synthetic.py`):

- a sanity gate first: a small Transformer must reach >= 0.9 on MQAR with 4 pairs
  in 64 tokens inside its training length; if it does not, the recipe (learning
  rate, steps, vocabulary) is wrong, not the models, and the report says so;
- every arm (MM-Rec with its long-term memory, the same keyed by its pooled state
  `mmrec_statekey`, the same without memory, the Transformer) trained on one stream
  mixing MQAR (up to 8 pairs in 128 tokens),
  spread MQAR (one pair per memory chunk, queries two chunks after their pair)
  and a multi-token passkey, at each learning rate of `--lrs` and each seed;
- scored, with greedy answers, on fresh sequences: MQAR by number of pairs at the
  training length (where does each arm's state fill up?), spread MQAR and passkey
  at 1x, 4x and 16x the training length, fed in pieces of the training length with
  the state carried (as decoding does; the Transformer's KV cache holds the whole
  sequence). MM-Rec is also scored with its memory's read-out zeroed
  (`/read_off`: does the trained model use its memory?).

Accuracy is the fraction of answer tokens predicted, against two chance levels:
1/|values| (a guess) and 1/N (a value of the sequence, not the bound one). Each
arm's figures are those of its best learning rate (by held-out answer accuracy on
the training mix), as the published comparisons report the best of a sweep.
Finished runs in `--out` are reused on rerun; a run trained otherwise is refused.
"""
