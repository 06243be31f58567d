"""The bottom layer: the job's vocabulary, shared by every other package.

spec (the typed job), records (what flows between roles), data, storage and checkpoints,
models (fetch, prune, tokenizer checks), env (per-node defaults) and console. Nothing here
imports another Protégé package (tests/unit/test_layers.py enforces it).
"""
