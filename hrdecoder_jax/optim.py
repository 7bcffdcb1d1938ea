"""The optimiser and learning-rate schedule of the reference (mmcv's SGD + PolyLrUpdaterHook), or AdamW."""
from __future__ import annotations

import jax.numpy as jnp
import ml_collections
import optax

from hrdecoder_jax import config_utils


def learning_rate_schedule(opt: ml_collections.ConfigDict, total_steps: int):
    """The reference's per-iteration lr (mmcv PolyLrUpdaterHook with linear warm-up), ``i`` 0-based:
    ``regular(i) = (lr - min_lr) * (1 - i / total) ** power + min_lr``;
    ``lr(i) = regular(i) * (1 - (1 - i / warmup) * (1 - warmup_ratio))`` for ``i < warmup``, else ``regular(i)``."""
    base, min_lr, power = opt.lr, opt.min_lr, opt.power
    warmup, ratio = opt.warmup_steps, opt.warmup_ratio

    def schedule(i):
        i = jnp.asarray(i, jnp.float32)
        # (total - i) / total rather than 1 - i / total: exact step counts keep float32 accurate at the end.
        regular = (base - min_lr) * jnp.maximum((total_steps - i) / total_steps, 0.0) ** power + min_lr
        if warmup <= 0:
            return regular
        # = 1 - (1 - i / warmup) * (1 - ratio), written so float32 keeps lr(0) = ratio * lr exactly.
        factor = ratio + (1.0 - ratio) * (i / warmup)
        return jnp.where(i < warmup, regular * factor, regular)

    return schedule


def make_optimizer(opt: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """SGD with PyTorch's coupled weight decay on every parameter (BN and biases included), or AdamW."""
    schedule = learning_rate_schedule(opt, total_steps)
    if opt.name == "sgd":
        return optax.chain(optax.add_decayed_weights(opt.weight_decay),
                           optax.sgd(schedule, momentum=opt.momentum))
    if opt.name == "adamw":
        return optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay)
    raise config_utils.ConfigError(f"optimizer.name must be 'sgd' or 'adamw', got {opt.name!r}")
