"""lmssl's own config files, one `get_config(arg)` each: `--config configs/mlm_base.py:size=tiny`.

They live inside the package so that an installed lmssl has them (`python -m lmssl.bench`
imports the task's base config by name, `lmssl.configs.mlm_base`); the repository's top-level
`configs` is a link to this folder, so the commands in the docs keep their short paths.
"""
