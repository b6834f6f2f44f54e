"""Sequence classification or regression on a pretrained backbone (single sentences or pairs).

CPU walk-through (after the MLM quickstart in /tmp/lmssl_tiny):
  python -m lmssl.data.derive --task order --source builtin --out /tmp/order
  python -m lmssl.main --config configs/cls_finetune.py --workdir /tmp/lmssl_order \\
      --config.init.params_from=/tmp/lmssl_tiny \\
      --config.task.train_source=tsv:/tmp/order/train.tsv \\
      --config.task.eval_source=tsv:/tmp/order/dev.tsv --config.train.lr=1e-3
  Is a passage in its original word order or reversed? 400 steps of 32 x 64 on 2 CPU cores:
  94 s, eval_accuracy 0.827 (majority class 0.507), from the 600-step tiny MLM.

Variants (comma-separated after the colon):
  glue=cola|sst2|mrpc|qqp|stsb|mnli|qnli|rte  columns, kind and metric of that GLUE task read
                       from TFDS (`tfds build glue/NAME` first, on a machine with internet)
  lora                 LoRA rank 8 on query/value: backbone frozen, adapters + head train
  smoke                a seconds-long run (tests use it)
Any knob: --config.task.text_fields=question,sentence --config.train.lr=3e-5 ...
The model's shape and tokenizer come from init.params_from (its config.json); from a HuggingFace
BERT folder: --config.init.params_from=hf:/path/to/bert-base-uncased.
"""

from lmssl import config as config_lib
from lmssl import errors

# name: (text fields, kind, metric, eval split)
GLUE = {
    "cola": ("sentence", "classification", "mcc", "validation"),
    "sst2": ("sentence", "classification", "accuracy", "validation"),
    "mrpc": ("sentence1,sentence2", "classification", "macro_f1", "validation"),
    "qqp": ("question1,question2", "classification", "macro_f1", "validation"),
    "stsb": ("sentence1,sentence2", "regression", "pearson", "validation"),
    "mnli": ("premise,hypothesis", "classification", "accuracy", "validation_matched"),
    "qnli": ("question,sentence", "classification", "accuracy", "validation"),
    "rte": ("sentence1,sentence2", "classification", "accuracy", "validation"),
}


def finetune_base():
  """BERT's fine-tuning recipe, scaled to short runs: AdamW, warmup 10%, linear decay."""
  c = config_lib.base_config()
  c.task.kind = "classification"
  c.data.seq_len = 64
  # BERT's range for base-size models is 2e-5..5e-5; the tiny CPU models want ~1e-3.
  c.train.steps, c.train.batch_size, c.train.lr = 400, 32, 5e-5
  c.train.warmup_steps, c.train.log_every = 40, 20
  c.eval.every_steps = c.checkpoint.every_steps = 100
  c.eval.batch_size = 64
  c.checkpoint.keep = 1
  return c


def apply_finetune_variants(c, v) -> None:
  """Variants every fine-tuning config shares: lora and smoke."""
  if v.lora:
    c.lora.rank, c.lora.alpha = 8, 16.0
    c.train.lr = 1e-3  # adapters start at zero and want a larger step
  if v.smoke:
    c.data.seq_len = 64
    c.train.steps, c.train.batch_size, c.train.warmup_steps = 4, 8, 1
    c.train.log_every = c.eval.every_steps = c.checkpoint.every_steps = 2
    c.eval.batch_size = 8


def get_config(arg: str = ""):
  v = config_lib.parse_arg(arg, glue="", lora=False, smoke=False)
  c = finetune_base()
  if v.glue:
    if v.glue not in GLUE:
      raise errors.UserError(f"unknown GLUE task {v.glue!r}; known: {list(GLUE)}")
    fields, c.task.kind, c.task.metric, eval_split = GLUE[v.glue]
    c.task.text_fields = fields
    c.task.train_source = f"tfds:glue/{v.glue}:train"
    c.task.eval_source = f"tfds:glue/{v.glue}:{eval_split}"
    c.data.seq_len = 128
  apply_finetune_variants(c, v)
  return c
