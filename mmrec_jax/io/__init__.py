"""What lives on disk: checkpoints, the run directory and its safety rules, exports,
and loading a trained model for research code (`mmrec_jax.load`)."""
