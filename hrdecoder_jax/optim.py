"""The optimiser and learning-rate schedule of the reference (mmcv's SGD + PolyLrUpdaterHook), or AdamW.

``make_optimizer`` gives an optax transformation (its ``init`` makes the state that checkpoints hold);
``apply_gradients`` is the step the trainer takes with it: the new parameters and optimiser state and the
gradient's L2 norm. On CPUs with the compiled kernels (``ops.library``) the step runs as custom calls over
groups of 32 parameter tensors (optax's formulas, operation for operation; the state keeps optax's structure),
where XLA would compile three to five small kernels per tensor; elsewhere it is optax itself.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from hrdecoder_jax.ops import library


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


class Optimizer(NamedTuple):
    """An optax ``GradientTransformation`` (``init``, ``update``) that also says what it is, so that
    ``apply_gradients`` can run it as one fused step."""

    init: Callable
    update: Callable
    name: str                    # 'sgd' or 'adamw'
    hyper: dict                  # momentum, weight_decay (sgd); b1, b2, eps, weight_decay (adamw)
    schedule: Callable           # step count -> learning rate


ADAM_EPS = 1e-8                  # optax.adamw's default, used as is


def make_optimizer(opt: ml_collections.ConfigDict, total_steps: int) -> Optimizer:
    """SGD with PyTorch's coupled weight decay on every parameter (BN and biases included), or AdamW."""
    schedule = learning_rate_schedule(opt, total_steps)
    if opt.name == "sgd":
        tx = optax.chain(optax.add_decayed_weights(opt.weight_decay), optax.sgd(schedule, momentum=opt.momentum))
        hyper = dict(momentum=float(opt.momentum), weight_decay=float(opt.weight_decay))
    else:   # "adamw": config_utils.validate_optimizer_config lets no other name through
        tx = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=ADAM_EPS, weight_decay=opt.weight_decay)
        hyper = dict(b1=float(opt.b1), b2=float(opt.b2), eps=ADAM_EPS, weight_decay=float(opt.weight_decay))
    return Optimizer(tx.init, tx.update, opt.name, hyper, schedule)


def apply_gradients(tx, grads, opt_state, params) -> tuple[Any, Any, jax.Array]:
    """``(new params, new optimiser state, global L2 norm of grads)`` for one step of ``tx``."""
    leaves = jax.tree.leaves(params)
    if (isinstance(tx, Optimizer) and leaves and all(x.dtype == jnp.float32 for x in leaves)
            and library.use_native(jnp.float32)):
        return _fused(tx, grads, opt_state, params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, optax.tree.norm(grads)


_GROUP = 32   # tensors per optimiser custom call


def _fused(tx: Optimizer, grads, opt_state, params):
    """The step as custom calls over groups of ``_GROUP`` tensors (``cpu_kernels.cc``: ``SgdStep`` /
    ``AdamwStep``), parameters and state updated in place. The scalars are computed here exactly as optax computes them."""
    p_leaves, treedef = jax.tree.flatten(params)
    g_leaves = treedef.flatten_up_to(grads)
    f32 = lambda v: np.float32(v)
    if tx.name == "sgd":
        decay_state, (trace_state, sched_state) = opt_state
        count = sched_state.count
        step = jnp.asarray(-1 * tx.schedule(count), jnp.float32)
        states = [treedef.flatten_up_to(trace_state.trace)]
        scalars = [step]
        target, attrs = "hrd_sgd_step", dict(wd=f32(tx.hyper["weight_decay"]), momentum=f32(tx.hyper["momentum"]))
    else:
        adam_state, decay_state, sched_state = opt_state
        count_inc = optax.safe_increment(adam_state.count)
        b1, b2 = tx.hyper["b1"], tx.hyper["b2"]
        c1 = (1 - b1 ** count_inc).astype(jnp.float32)
        c2 = (1 - b2 ** count_inc).astype(jnp.float32)
        step = jnp.asarray(-1 * tx.schedule(sched_state.count), jnp.float32)
        states = [treedef.flatten_up_to(adam_state.mu), treedef.flatten_up_to(adam_state.nu)]
        scalars = [step, c1, c2]
        target = "hrd_adamw_step"
        attrs = dict(b1=f32(b1), one_minus_b1=f32(1 - b1), b2=f32(b2), one_minus_b2=f32(1 - b2),
                     eps=f32(tx.hyper["eps"]), wd=f32(tx.hyper["weight_decay"]))
    per = 1 + len(states)
    new_p, new_s, norms = [], [[] for _ in states], []
    # One custom call per group of tensors: XLA's fusion pass slows down with the operand count of a single
    # instruction (8.3 s for one call over the W18 step's ~600 tensors, 0.15 s in groups of 32).
    for start in range(0, len(p_leaves), _GROUP):
        idx = range(start, min(start + _GROUP, len(p_leaves)))
        operands, results, aliases = list(scalars), [], {}
        for i in idx:
            base = len(operands)
            operands += [p_leaves[i], g_leaves[i], *(s[i] for s in states)]
            for k, arr in enumerate([p_leaves[i], *(s[i] for s in states)]):
                aliases[base + (0 if k == 0 else k + 1)] = len(results)
                results.append(jax.ShapeDtypeStruct(arr.shape, arr.dtype))
        results.append(jax.ShapeDtypeStruct((), jnp.float32))
        out = jax.ffi.ffi_call(target, results, input_output_aliases=aliases)(*operands, **attrs)
        new_p += [out[j * per] for j in range(len(idx))]
        for k in range(len(states)):
            new_s[k] += [out[j * per + 1 + k] for j in range(len(idx))]
        norms.append(out[-1])
    norm = norms[0] if len(norms) == 1 else jnp.sqrt(jnp.sum(jnp.square(jnp.stack(norms))))
    params = jax.tree.unflatten(treedef, new_p)
    if tx.name == "sgd":
        trace = jax.tree.unflatten(treedef, new_s[0])
        opt_state = (decay_state, (trace_state._replace(trace=trace),
                                   sched_state._replace(count=optax.safe_increment(count))))
    else:
        opt_state = (adam_state._replace(count=count_inc, mu=jax.tree.unflatten(treedef, new_s[0]),
                                         nu=jax.tree.unflatten(treedef, new_s[1])),
                     decay_state, sched_state._replace(count=optax.safe_increment(sched_state.count)))
    return params, opt_state, norm
