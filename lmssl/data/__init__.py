"""Data: sources -> tokenizer -> prepare (offline, cached) -> pipeline (tf.data, per host)."""

import os

# TensorFlow serves lmssl only as tf.data over integer arrays, where its oneDNN kernels never
# run; with them on, its import prints a notice about them (twice, through absl's pre-init
# logging) before lmssl's first line. Its INFO lines (a notice of the CPU features it was not
# built for) come the same way unless JAX has set up that logging first, which the data
# commands (prepare, derive) do not import. A user's own setting wins.
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
