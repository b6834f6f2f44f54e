"""Token classification (NER-style tagging, CoNLL files) on a pretrained backbone.

CPU walk-through (after the MLM quickstart in /tmp/lmssl_tiny):
  python -m lmssl.data.derive --task truecase --source builtin --out /tmp/truecase
  python -m lmssl.main --config configs/ner_finetune.py --workdir /tmp/lmssl_truecase \\
      --config.init.params_from=/tmp/lmssl_tiny \\
      --config.task.train_source=conll:/tmp/truecase/train.conll \\
      --config.task.eval_source=conll:/tmp/truecase/dev.conll --config.train.lr=1e-3
  Which words of a lowercased sentence were capitalized (B-CAP/I-CAP/O)? Reports entity-level
  F1 (exact spans, conlleval rules) and token accuracy: 85 s on 2 CPU cores, entity F1 0.62,
  token accuracy 0.94, from the 600-step tiny MLM.
  CoNLL-2003: --config.task.train_source=conll:eng.train --config.task.eval_source=conll:eng.testa

Variants (comma-separated after the colon):
  lora     LoRA rank 8 on query/value: backbone frozen, adapters + head train
  smoke    a seconds-long run (tests use it)
Labels sit on the first sentencepiece piece of each word; the rest of a word is not scored.
"""

import importlib.util
import os

from lmssl import config as config_lib


def _cls_config():
  # The shared fine-tuning recipe lives beside this file.
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cls_finetune.py")
  spec = importlib.util.spec_from_file_location("cls_finetune", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg: str = ""):
  v = config_lib.parse_arg(arg, lora=False, smoke=False)
  cls = _cls_config()
  c = cls.finetune_base()
  c.task.kind = "tokens"
  c.task.text_fields = c.task.label_field = ""  # CoNLL columns are positional
  c.data.seq_len = 64
  cls.apply_finetune_variants(c, v)
  return c
