"""Data: sources -> tokenizer -> prepare (offline, cached) -> pipeline (tf.data, per host)."""
