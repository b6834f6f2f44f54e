"""AdamW with warmup then linear or cosine decay, global-norm clipping, and no weight decay on
biases and LayerNorm parameters (as BERT). It sees only the parameters that train: with LoRA
the step hands it the trainable part alone (`lora.split`)."""

import jax
import optax

# train.schedule -> the decay after warmup, from lr to end_lr_frac * lr over `steps`.
SCHEDULES = {
    "linear": lambda t, steps: optax.linear_schedule(t.lr, t.lr * t.end_lr_frac, steps),
    "cosine": lambda t, steps: optax.cosine_decay_schedule(t.lr, steps, alpha=t.end_lr_frac),
}


def learning_rate(train_cfg) -> optax.Schedule:
  t = train_cfg
  decay = SCHEDULES[t.schedule](t, max(t.steps - t.warmup_steps, 1))
  warmup = optax.linear_schedule(0.0, t.lr, max(t.warmup_steps, 1))
  return optax.join_schedules([warmup, decay], [t.warmup_steps])


def path_names(path) -> list[str]:
  # Boxed (logically partitioned) leaves add a trailing "value" to the path.
  names = [getattr(k, "key", getattr(k, "name", str(k))) for k in path]
  return [n for n in names if n != "value"]


def decay_mask(params):
  """True where weight decay applies: kernels and embeddings, not biases or norms."""
  def decays(path, _):
    names = path_names(path)
    return names[-1] not in ("bias", "scale") and not any("norm" in n for n in names)
  return jax.tree_util.tree_map_with_path(decays, params)


def make(train_cfg) -> optax.GradientTransformation:
  """Clipped AdamW."""
  t = train_cfg
  return optax.chain(
      optax.clip_by_global_norm(t.grad_clip),
      optax.adamw(learning_rate(t), b1=t.b1, b2=t.b2, eps=t.eps,
                  weight_decay=t.weight_decay, mask=decay_mask),
  )
