"""The `hf` extra (torch, safetensors, transformers, tokenizers): imported only when a
HuggingFace folder or tokenizer is read or written, so lmssl installs and trains without it.
A module of it missing is told as such, naming that module and the install command."""

import importlib

from lmssl import errors

INSTALL = "pip install 'lmssl[hf]' (after `pip install torch` for your platform)"


class MissingExtra(errors.UserError):
  """A module of the `hf` extra cannot be imported here: `module` names it, `missing` says
  why."""

  def __init__(self, module: str, missing: str):
    super().__init__(f"HuggingFace files need the `hf` extra, and {missing}; install it: "
                     f"{INSTALL}")
    self.module, self.missing = module, missing


def load(module: str):
  """`module` of the hf extra, imported; else MissingExtra, which says how to install it."""
  try:
    return importlib.import_module(module)
  except ImportError as e:
    raise MissingExtra(module, f"{module} cannot be imported here ({e})") from e
