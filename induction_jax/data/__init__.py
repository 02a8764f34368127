"""Sources -> pieces -> BPE tokenizer -> token store -> stateless multi-host loader, and the fixed eval set a run
keeps. `python -m induction_jax.data prepare --config ...` prepares the data (__main__.py)."""
