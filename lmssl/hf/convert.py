"""python -m lmssl.convert {from-hf,to-hf,check}: HuggingFace models <-> lmssl runs (BERT,
GPT-2, Llama, Mistral, Qwen2, ModernBERT).

  from-hf --hf_dir DIR --workdir OUT      a local HF folder -> an lmssl run directory (config.json,
                                          checkpoints/0 with the parameters, tokenizer/)
  to-hf --workdir RUN --hf_dir OUT [--best]  an lmssl run -> config.json, model.safetensors and
                                          the tokenizer files, loadable by `transformers`
  check --hf_dir DIR [--text T ...]       runs the HF model and its lmssl conversion on the same
                                          texts; prints the max abs differences as one JSON line

Needs the `hf` extra (torch, transformers, safetensors, tokenizers), imported lazily, only
under `lmssl.hf`.
"""

import argparse
import json
import os
import shutil
import sys
import tempfile

import jax
import ml_collections
import numpy as np

from lmssl import checkpoint
from lmssl import config as config_lib
from lmssl import errors
from lmssl import heads as heads_lib
from lmssl import inference
from lmssl import metrics
from lmssl import model as model_lib
from lmssl.hf import families
from lmssl.hf import folder
from lmssl.hf import tokenizer as tokenizer_lib
from lmssl.hf import weights

SAMPLE_TEXTS = (
    "The tower is 324 metres tall, about the same height as an 81-storey building.",
    "Valkyria Chronicles III is a tactical role-playing game developed by Sega.",
    "It rained.",
)


def _fresh_output(path: str, what: str) -> str:
  """A temporary sibling of `path` to write into; `path` must be absent or empty."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
    raise errors.UserError(f"{what} {path} already exists and is not empty; name a new or "
                           "empty directory (nothing was written)")
  os.makedirs(os.path.dirname(path), exist_ok=True)
  return tempfile.mkdtemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.")


def _publish(tmp: str, path: str) -> None:
  """Moves the finished `tmp` into place, so a failure never leaves half an output."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(path):
    os.rmdir(path)
  os.rename(tmp, path)


def _copy_tokenizer(source_dir: str, target_dir: str) -> list[str]:
  names = folder.tokenizer_files(source_dir)
  os.makedirs(target_dir, exist_ok=True)
  for name in names:
    shutil.copyfile(os.path.join(source_dir, name), os.path.join(target_dir, name))
  return names


def write_run(directory: str, cfg, params, metadata: dict) -> None:
  """A run directory of parameters only (config.json, checkpoints/0), which `eval`, `sample`,
  `init.params_from` and `to_hf` read and training does not resume."""
  mngr = checkpoint.manager(directory, ml_collections.ConfigDict(dict(keep=1, async_save=False)))
  checkpoint.save(mngr, 0, {"params": params}, {"params_only": True, **metadata})
  checkpoint.wait(mngr)
  checkpoint.close(mngr)
  with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
    f.write(config_lib.to_json(cfg))


def from_hf(hf_dir: str, workdir: str) -> dict:
  """Converts the HF folder into a new lmssl run directory; returns a summary."""
  tmp = _fresh_output(workdir, "--workdir")
  final = os.path.abspath(os.path.expanduser(workdir))
  try:
    converted = weights.convert(hf_dir)
    cfg, params, notes = converted.config, converted.params, converted.notes
    if cfg.data.tokenizer:
      _copy_tokenizer(cfg.data.tokenizer, os.path.join(tmp, "tokenizer"))
      cfg = config_lib.resolved(cfg, {"data.tokenizer": os.path.join(final, "tokenizer")})
    else:
      notes.append(f"{hf_dir} has no tokenizer files: set --config.data.tokenizer when using "
                   "this run")
    write_run(tmp, cfg, params, {"converted_from": os.path.abspath(hf_dir)})
    _publish(tmp, final)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  count = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(params))
  return {"workdir": final, "objective": cfg.objective, "modules": sorted(params),
          "parameters": count, "tokenizer": cfg.data.tokenizer or None, "notes": notes}


def _special_ids(family: families.Family, tok) -> dict:
  """The special token ids config.json names: the tokenizer's, or none (not HF's defaults,
  which may lie outside a small vocabulary) for a run without one."""
  ids = {f"{role}_token_id": getattr(tok, f"{role}_id", None) for role in family.special_roles}
  return {k: v for k, v in ids.items() if v is not None or tok is None}


def to_hf(workdir: str, hf_dir: str, best: bool = False) -> dict:
  """Writes the run's model as a HF folder (config.json, model.safetensors, tokenizer)."""
  cfg = config_lib.load_run_config(workdir)
  family = families.check_exportable(cfg)
  params = checkpoint.read_params(os.path.join(workdir, "best") if best else workdir)
  cfg, params = inference.merged(cfg, params)
  params = jax.tree.map(np.asarray, params)
  architecture = family.architecture(cfg, set(params) - {"transformer", "pooler"})
  tensors = weights.from_lmssl(family, params, base_only=architecture == family.base_model)
  tokenizer_path = config_lib.tokenizer_path(cfg, workdir)
  tok = tokenizer_lib.load(tokenizer_path) if os.path.exists(tokenizer_path) else None
  hf_config = families.hf_config_for(cfg, family, architecture, _special_ids(family, tok))
  tmp = _fresh_output(hf_dir, "--hf_dir")
  try:
    folder.write_dir(tmp, hf_config, tensors)
    tokenizer = _export_tokenizer(tok, tokenizer_path, tmp, family)
    _publish(tmp, hf_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return {"hf_dir": os.path.abspath(hf_dir), "architecture": architecture,
          "tensors": len(tensors), "tokenizer": tokenizer}


def _export_tokenizer(tok, path: str, hf_dir: str, family: families.Family) -> list[str]:
  """Writes the run's tokenizer for transformers; returns the files written."""
  if tok is None:
    return []
  if os.path.isdir(path):  # an imported model's own tokenizer files
    return _copy_tokenizer(path, hf_dir)
  try:
    tokenizer_lib.HFTokenizer.from_sentencepiece(
        tok.model_bytes, path, cls_sep_template=family.encoder).save(hf_dir)
  except errors.UserError as e:  # a sentencepiece BPE model: hand over the model itself
    shutil.copyfile(path, os.path.join(hf_dir, "tokenizer.model"))
    return [f"tokenizer.model (sentencepiece, not converted: {e})"]
  return folder.tokenizer_files(hf_dir)


def _inputs(cfg, tok, texts, family):
  """Right-padded ids [B, L] and real-token mask of `texts` as the HF model expects them."""
  if tok is None:  # no tokenizer files: fixed pseudo-random ids
    rng = np.random.default_rng(0)
    rows = [list(rng.integers(0, cfg.model.vocab_size, size=n)) for n in (16, 11, 5)]
  elif family.encoder:
    rows = [[tok.cls_id, *tok.encode(t)[:cfg.data.seq_len - 2], tok.sep_id] for t in texts]
  else:
    rows = [tok.encode(t)[:cfg.data.seq_len] for t in texts]
  length = max(map(len, rows))
  pad = tok.pad_id if tok is not None else 0
  ids = np.array([r + [pad] * (length - len(r)) for r in rows], np.int32)
  real = np.array([[1] * len(r) + [0] * (length - len(r)) for r in rows], np.int32)
  return ids, real


def lmssl_outputs(cfg, params, ids, real) -> dict:
  """{"hidden": [B, L, D], head: output} of the lmssl model on right-padded `ids`."""
  mc = model_lib.module_config(cfg.model)
  length = ids.shape[1]
  batch = dict(input_ids=ids, segment_ids=real, token_types=np.zeros_like(ids),
               positions=np.where(real > 0, np.arange(length)[None], 0).astype(np.int32),
               masked_positions=np.tile(np.arange(length, dtype=np.int32), (len(ids), 1)))
  causal = cfg.objective == "clm"
  hidden, _ = model_lib.Transformer(mc).apply(
      {"params": params["transformer"]}, batch["input_ids"], batch["segment_ids"],
      batch["positions"], batch["token_types"], causal=causal)
  out = {"hidden": hidden}
  heads = weights.heads_of(cfg, params)
  if heads:
    labels = [n for n in cfg.task.labels.split(",") if n]
    model = heads_lib.LanguageModel(mc, cfg.objective, tuple(heads), len(labels) or 1)
    out.update(model.apply({"params": params}, batch))
  return out


def _hf_outputs(model, ids, real, family) -> dict:
  import torch
  kwargs = dict(input_ids=torch.from_numpy(ids.astype(np.int64)),
                attention_mask=torch.from_numpy(real.astype(np.int64)),
                output_hidden_states=True)
  if family is families.BERT:  # the one family with token types
    kwargs["token_type_ids"] = torch.zeros_like(kwargs["input_ids"])
  with torch.no_grad():
    out = model(**kwargs)
  found = {"hidden": out.hidden_states[-1]}
  for name, key in (("logits", "logits"), ("prediction_logits", "mlm"),
                    ("seq_relationship_logits", "pair")):
    if getattr(out, name, None) is not None:
      found[key] = getattr(out, name)
  return {k: v.float().numpy() for k, v in found.items()}


def check(hf_dir: str, texts=SAMPLE_TEXTS) -> dict:
  """Max abs differences between the HF model and its lmssl conversion on `texts`."""
  import torch
  import transformers
  converted = weights.convert(hf_dir)
  cfg, params, family = converted.config, converted.params, converted.family
  architecture = (converted.hf_config.get("architectures") or [family.base_model])[0]
  model = getattr(transformers, architecture).from_pretrained(hf_dir, dtype=torch.float32).eval()
  tok = tokenizer_lib.load(cfg.data.tokenizer) if cfg.data.tokenizer else None
  ids, real = _inputs(cfg, tok, texts, family)
  theirs = _hf_outputs(model, ids, real, family)
  ours = {k: np.asarray(v) for k, v in lmssl_outputs(cfg, params, ids, real).items()}
  if "logits" in theirs:  # the one head's output, under its lmssl name
    theirs[weights.heads_of(cfg, params)[0]] = theirs.pop("logits")
  report = {"hf_dir": os.path.abspath(hf_dir), "architecture": architecture,
            "texts": len(ids), "tokens": int(real.sum()),
            "inputs": "tokenizer" if tok is not None else "random ids (no tokenizer files)"}
  mask = real.astype(bool)
  for key in sorted(set(theirs) & set(ours)):
    a, b = theirs[key], ours[key]
    a = a.reshape(b.shape) if a.size == b.size else a  # regression: [B, 1] vs [B]
    diff = np.abs(a - b)[mask] if a.ndim >= 2 and a.shape[:2] == mask.shape else np.abs(a - b)
    report[f"max_abs_diff_{'hidden' if key == 'hidden' else key + '_logits'}"] = float(
        diff.max())
  if tok is not None:
    report["tokenizer_ids_equal"] = _tokenizer_agrees(hf_dir, tok, texts)
  return report


def _tokenizer_agrees(hf_dir: str, tok, texts) -> bool | None:
  """Whether transformers' own tokenizer for `hf_dir` gives lmssl's ids (None if it has none)."""
  import transformers
  try:
    theirs = transformers.AutoTokenizer.from_pretrained(hf_dir)
  except (OSError, ValueError):
    return None
  return all(theirs(t, add_special_tokens=False)["input_ids"] == tok.encode(t) for t in texts)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(prog="python -m lmssl.convert", description=__doc__.split(
      "\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  p = sub.add_parser("from-hf", help="HF folder -> lmssl run directory")
  p.add_argument("--hf_dir", required=True)
  p.add_argument("--workdir", required=True)
  p = sub.add_parser("to-hf", help="lmssl run -> HF folder")
  p.add_argument("--workdir", required=True)
  p.add_argument("--hf_dir", required=True)
  p.add_argument("--best", action="store_true", help="a fine-tuning run's best checkpoint")
  p = sub.add_parser("check", help="HF vs lmssl outputs on the same texts")
  p.add_argument("--hf_dir", required=True)
  p.add_argument("--text", action="append", help="a text to run (repeat); default: built-in")
  args = parser.parse_args(argv)
  try:
    if args.command == "from-hf":
      result = from_hf(args.hf_dir, args.workdir)
    elif args.command == "to-hf":
      result = to_hf(args.workdir, args.hf_dir, args.best)
    else:
      result = check(args.hf_dir, args.text or SAMPLE_TEXTS)
  except errors.UserError as e:
    sys.exit(f"lmssl.convert: error: {e}")
  except ImportError as e:
    sys.exit(f"lmssl.convert: error: {e}; install the HuggingFace extra: pip install "
             "'lmssl[hf]' (after `pip install torch` for your platform)")
  for note in result.pop("notes", []):
    metrics.log(note)
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  main()
