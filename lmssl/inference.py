"""Using a trained run: its parameters read back for evaluation, generation and fill-mask."""

import hashlib
import os

import jax
import ml_collections

from lmssl import checkpoint
from lmssl import config as config_lib
from lmssl import errors
from lmssl import lora
from lmssl import sample
from lmssl import sharding
from lmssl import steps
from lmssl.hf import tokenizer as tokenizer_lib


def inference_mesh():
  """Data parallel over every device: parameters replicated, batches split."""
  return sharding.make_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)))


def load_run(workdir: str, best: bool = False, mesh=None):
  """(config, parameters) of the run in `workdir`: its latest checkpoint, or with `best` the
  best evaluation of a fine-tuning run. LoRA adapters stay separate (see `merged`)."""
  return load_checkpoint(workdir, best, mesh)[:2]


def load_checkpoint(workdir: str, best: bool = False, mesh=None):
  """`load_run`'s (config, parameters), and the checkpoints/STEP directory they were read
  from: the newest intact one, which is not the latest when that one is damaged."""
  cfg = config_lib.resolved(config_lib.load_run_config(workdir))  # read, never changed
  path = os.path.join(workdir, "best") if best else workdir
  if best and not os.path.isdir(path):
    raise errors.UserError(f"{workdir} has no best/ checkpoint (only fine-tuning runs keep "
                           "one); leave out --best to use the latest checkpoint")
  tok = tokenizer(cfg, workdir)
  mesh = mesh or inference_mesh()
  abstract = steps.abstract_params(cfg, mesh)
  # The newest intact checkpoint; a damaged newer one is named and left in place.
  values, meta, read = checkpoint.load_run_params(workdir, path, abstract)
  # A run's checkpoints store a digest of its tokenizer (train.py): another run's tokenizer in
  # its place would encode and decode with other pieces, so eval and sample refuse it too.
  if meta.get("tokenizer", _digest(tok)) != _digest(tok):
    raise errors.UserError(
        f"tokenizer {tok.path} is not the one the checkpoints in {workdir} were trained with "
        "(its pieces differ); put back that run's tokenizer (e.g. from a copy), or start over "
        "in a new --workdir")
  params = jax.tree_util.tree_map_with_path(lambda p, x: values[jax.tree_util.keystr(p)],
                                            abstract)
  return cfg, params, read


def _digest(tok) -> str:
  return hashlib.sha256(tok.fingerprint).hexdigest()


def merged(cfg, params):
  """An adapter-free (config, parameters): LoRA folded into the kernels."""
  if not cfg.lora.rank:
    return cfg, params
  return config_lib.resolved(cfg, {"lora.rank": 0}), lora.merge(params, cfg.lora.alpha,
                                                                 cfg.lora.rank)


def tokenizer(cfg, workdir: str) -> tokenizer_lib.AnyTokenizer:
  """The tokenizer the run in `workdir` was trained with; a missing or damaged one is named
  with the fix (eval and sample take no tokenizer setting)."""
  return tokenizer_lib.load_of_run(config_lib.tokenizer_path(cfg, workdir), workdir)


def generate_text(workdir: str, prompts: list[str], *, best: bool = False, **options) -> list[str]:
  """Continuations of `prompts` by the causal LM in `workdir` (options: see sample.generate)."""
  cfg, params = merged(*load_run(workdir, best))
  if cfg.objective != "clm":
    raise errors.UserError(f"{workdir} holds a {cfg.objective} model; generation needs a causal "
                           "LM (objective clm). For an MLM model put [MASK] in the prompt to fill "
                           "it in")
  tok = tokenizer(cfg, workdir)
  ids = [[tok.bos_id] + tok.encode(p) for p in prompts]
  try:
    out = sample.generate(cfg.model, params, ids, eos_id=tok.eos_id, **options)
  except ValueError as e:
    raise errors.UserError(str(e)) from None
  return [tok.decode(o) for o in out]


def fill_mask_text(workdir: str, text: str, *, top_k: int = 5,
                   best: bool = False) -> list[list[tuple[str, float]]]:
  """The top-k pieces (and probabilities) for each [MASK] in `text`, by the MLM in `workdir`."""
  cfg, params = merged(*load_run(workdir, best))
  if cfg.objective != "mlm" or cfg.task.kind:
    raise errors.UserError(f"{workdir} is not a masked-LM pretraining run; fill-mask needs one")
  tok = tokenizer(cfg, workdir)
  ids = [tok.cls_id] + tok.encode_with_masks(text) + [tok.sep_id]
  try:
    found = sample.fill_mask(cfg.model, params, ids, top_k=top_k, mask_id=tok.mask_id)
  except ValueError as e:
    raise errors.UserError(str(e)) from None
  return [[(tok.id_to_piece(i), p) for i, p in candidates] for candidates in found]
