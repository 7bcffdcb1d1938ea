"""The train step: one jitted function for every random HR-crop draw, sharded over a ``data`` mesh axis.

``make_train_step`` is the pure step; ``jit_train_step`` compiles it the way training runs it (batch sharded
over every device of every process, so BN statistics are global like the reference's SyncBN; parameters,
model state and optimiser state replicated and donated). Training and the benchmark both use these.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from hrdecoder_jax.optim import apply_gradients


class TrainState(NamedTuple):
    """How a model travels through the jitted step: ``params`` and ``rest`` (BN statistics and every other
    non-parameter variable) as plain nested dicts of arrays, plus what it takes to rebuild the module.

    Plain dicts, not ``nnx.State``: every call of a jitted function flattens its arguments, and flattening
    the ~2,500 ``nnx.Variable`` objects of an HRNet state in Python cost ~75 ms per step (measured on a
    CPU), more than an H200 needs for the whole step."""

    graphdef: Any
    params_template: Any   # abstract nnx.State of the parameters (shapes only)
    rest_template: Any


def split_for_training(model: nnx.Module) -> tuple[TrainState, dict, dict]:
    """``(structure, params, rest)`` of ``model``: the step's plain-dict state and how to rebuild it."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    structure = TrainState(graphdef, jax.eval_shape(lambda: params), jax.eval_shape(lambda: rest))
    return structure, nnx.to_pure_dict(params), nnx.to_pure_dict(rest)


def _state(template, pure):
    state = jax.tree.map(lambda x: x, template)   # a fresh State; its values are then replaced
    nnx.replace_by_pure_dict(state, pure)
    return state


def merge_model(structure: TrainState, params: dict, rest: dict) -> nnx.Module:
    """The module of ``structure`` holding ``params`` and ``rest`` (as ``split_for_training`` returns them)."""
    return nnx.merge(structure.graphdef, _state(structure.params_template, params),
                     _state(structure.rest_template, rest), copy=True)


def make_train_step(structure: TrainState, tx: optax.GradientTransformation, *, seed: int,
                    grad_accum_steps: int = 1, finish=None):
    """``step(params, rest, opt_state, step, images, labels) -> (params, rest, opt_state, metrics)``.

    ``params`` and ``rest`` are the plain dicts of ``split_for_training`` (``opt_state = tx.init(params)``).
    Crop boxes come from ``fold_in(PRNGKey(seed), step)``, so the function is traced once for every draw
    and a resumed run draws the same crops. ``metrics``: the loss terms and ``grad_norm``.
    ``finish``: optional ``(images, labels) -> (images, labels)`` applied first, inside the step (the
    trainer passes ``data.on_device.make_finish``: the host sends raw uint8 crops, normalised here).
    """
    base_key = jax.random.PRNGKey(seed)

    def loss_fn(params, rest, images, labels, key):
        model = merge_model(structure, params, rest)
        losses = model.train_losses(images, labels, key=key)
        return losses["total"], (losses, nnx.to_pure_dict(nnx.state(model, nnx.Not(nnx.Param))))

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step_fn(params, rest, opt_state, step, images, labels):
        if finish is not None:
            images, labels = finish(images, labels)
        key = jax.random.fold_in(base_key, step)
        if grad_accum_steps == 1:
            (_, (losses, rest)), grads = grad_fn(params, rest, images, labels, key)
        else:
            # Micro-batches in sequence; BN statistics are then per micro-batch (documented trade-off).
            n = grad_accum_steps
            split = lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:])
            zeros = jax.tree.map(jnp.zeros_like, params)

            def body(carry, xs):
                rest, acc, loss_acc = carry
                imgs, labs, i = xs
                (_, (losses, rest)), g = grad_fn(params, rest, imgs, labs, jax.random.fold_in(key, i))
                acc = jax.tree.map(lambda a, b: a + b / n, acc, g)
                loss_acc = jax.tree.map(lambda a, b: a + b / n, loss_acc, losses)
                return (rest, acc, loss_acc), None

            loss0 = jax.eval_shape(lambda: grad_fn(params, rest, split(images)[0], split(labels)[0], key)[0][1][0])
            loss0 = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), loss0)
            (rest, grads, losses), _ = jax.lax.scan(
                body, (rest, zeros, loss0), (split(images), split(labels), jnp.arange(n)))
        params, opt_state, grad_norm = apply_gradients(tx, grads, opt_state, params)
        metrics = dict(losses)
        metrics["grad_norm"] = grad_norm
        return params, rest, opt_state, metrics

    return step_fn


def make_mesh(devices=None) -> jax.sharding.Mesh:
    """One ``data`` axis over ``devices`` (default: every device of every process; GSPMD-style auto axis)."""
    devices = jax.devices() if devices is None else list(devices)
    return jax.make_mesh((len(devices),), ("data",), axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def jit_train_step(step_fn, mesh: jax.sharding.Mesh):
    """``step_fn`` jitted as training runs it: images and labels sharded over ``data``, everything else
    replicated; params, rest and opt_state donated."""
    data, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    return jax.jit(step_fn, donate_argnums=(0, 1, 2),
                   in_shardings=(replicated, replicated, replicated, replicated, data, data),
                   out_shardings=(replicated, replicated, replicated, replicated))
