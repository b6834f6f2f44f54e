"""The PyTorch side of `lmssl.bench --parity hf`: a HuggingFace model folder trained step by step
on batches, loss targets, learning rates and decay flags that lmssl hands over, with AdamW and
global-norm clipping written to do what lmssl's optax chain does. It imports no lmssl module:
everything lmssl decides (which positions count, what attention sees, which tensors decay, the
schedule) arrives as data, so nothing here restates lmssl's rules.

Shape letters: B batch, L length, X loss positions per row (MLM's P, or CLM's L), V vocab.
"""

import time

import numpy as np

# torch and transformers (the `hf` extra) are imported in the functions that use them.


def load(hf_dir: str, architecture: str, ties: dict):
  """The folder's model (a torch.nn.Module) in float32, in training mode with every dropout at
  0, eager attention (which adds a 4D float mask to the scores as given). `ties` {name: name}
  must be one tensor."""
  import torch
  import transformers
  transformers.logging.set_verbosity_error()
  transformers.utils.logging.disable_progress_bar()
  config = transformers.AutoConfig.from_pretrained(hf_dir)
  for key, value in config.to_dict().items():
    if ("dropout" in key or "pdrop" in key) and isinstance(value, float):
      setattr(config, key, 0.0)
  model = getattr(transformers, architecture).from_pretrained(
      hf_dir, config=config, dtype=torch.float32, attn_implementation="eager")
  model.train()
  live = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
  if live:
    raise ValueError(f"dropout left on in {live[:5]}")
  for name, target in ties.items():
    if model.get_parameter(name) is not model.get_parameter(target):
      raise ValueError(f"{name} is not tied to {target} after loading")
  return model


def param_groups(model, decays: dict, weight_decay: float) -> list[dict]:
  """Two AdamW groups: the tensors `decays` flags, and the rest. Every parameter must be named."""
  unknown = [n for n, _ in model.named_parameters() if n not in decays]
  if unknown:
    raise ValueError(f"no decay flag for {unknown[:5]}")
  groups = ([p for n, p in model.named_parameters() if decays[n]],
            [p for n, p in model.named_parameters() if not decays[n]])
  return [dict(params=groups[0], weight_decay=weight_decay),
          dict(params=groups[1], weight_decay=0.0)]


def additive_mask(allowed_Bx1xLxL: np.ndarray):
  """0 where attention may look, the dtype's minimum elsewhere (a fully hidden padding row then
  reads uniformly, finite, as lmssl's reference kernel does; no real token sees it)."""
  import torch
  allowed = torch.from_numpy(np.array(allowed_Bx1xLxL, bool))
  return torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)


def loss(logits_BxLxV, positions_BxX, targets_BxX, weights_BxX):
  """The weighted mean cross-entropy at the positions lmssl's loss reads: summed over the
  batch, divided by the batch's total weight (at least 1)."""
  import torch
  picked_BxXxV = torch.take_along_dim(logits_BxLxV, positions_BxX[..., None], dim=1)
  xent_BxX = torch.nn.functional.cross_entropy(picked_BxXxV.transpose(1, 2), targets_BxX,
                                               reduction="none")
  return (xent_BxX * weights_BxX).sum() / weights_BxX.sum().clamp(min=1.0)


def clip_(params: list, max_norm: float) -> tuple[float, bool]:
  """optax.clip_by_global_norm: g / norm * max_norm when norm >= max_norm, else untouched (no
  epsilon, unlike torch's clip_grad_norm_). Returns (norm before clipping, whether clipped)."""
  import torch
  grads = [p.grad for p in params if p.grad is not None]
  norm = torch.sqrt(sum(torch.sum(g * g) for g in grads))
  clipped = not bool(norm < max_norm)
  if clipped:
    for g in grads:
      g.copy_(g / norm * max_norm)
  return float(norm), clipped


def train(model, batches: list, *, lrs: list, decays: dict, b1: float, b2: float,
          eps: float, weight_decay: float, grad_clip: float) -> dict:
  """One step per batch (a dict of numpy arrays: input_ids, position_ids, optional
  token_type_ids, allowed [B, 1, L, L] or {HF layer type: that}, loss positions, targets,
  weights), at lrs[i].
  Returns the losses, gradient norms, clipped steps, seconds and final tensors."""
  import torch
  opt = torch.optim.AdamW(param_groups(model, decays, weight_decay), lr=0.0, betas=(b1, b2),
                          eps=eps, foreach=False)
  params = [p for group in opt.param_groups for p in group["params"]]
  out = {"loss": [], "grad_norm": [], "clipped": []}
  start = time.perf_counter()
  for batch, lr in zip(batches, lrs):
    inputs = {k: torch.from_numpy(np.array(batch[k], np.int64))
              for k in ("input_ids", "position_ids", "token_type_ids") if k in batch}
    allowed = batch["allowed"]  # one mask, or {layer type: mask}
    mask = ({k: additive_mask(v) for k, v in allowed.items()} if isinstance(allowed, dict)
            else additive_mask(allowed))
    logits = model(**inputs, attention_mask=mask, use_cache=False).logits
    value = loss(logits, *(torch.from_numpy(np.array(batch[k], t)) for k, t in (
        ("positions", np.int64), ("targets", np.int64), ("weights", np.float32))))
    value.backward()
    norm, clipped = clip_(params, grad_clip)
    for group in opt.param_groups:
      group["lr"] = lr
    opt.step()
    opt.zero_grad(set_to_none=True)
    out["loss"].append(value.item())
    out["grad_norm"].append(norm)
    out["clipped"].append(clipped)
  out["seconds"] = time.perf_counter() - start
  out["tensors"] = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
  return out
