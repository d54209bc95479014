"""Launchers: `python -m mmrec_jax.launch.local` runs a multi-process job on this machine.

The cluster launchers (Cloud TPU VMs, SLURM, plain multi-node) are shell scripts in
the repository's `launch/` folder.
"""
