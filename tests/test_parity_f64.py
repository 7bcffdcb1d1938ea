"""Float64 identity with the original PyTorch code: HRDecoder, Efficient-HRDecoder and the FCN baseline.

In float64 two implementations of the same function agree to ~1e-12 relative, so these tests separate a
real difference (padding, resize convention, BN mode, crop mapping, index arithmetic) from rounding; the
float32 tests in ``test_models.py`` can only bound rounding (~1e-5 at this depth, ~1e-2 on W48 gradients).
Every model here runs as users run it in float64: config ``model.dtype='float64'`` under ``jax_enable_x64``.

Fixtures (``tests/fixtures/README.md``): ``tiny_w18_256_hr128_f64.npz`` (the float32 tiny fixture's weights
and input through the original in float64: fused logits, losses with the recorded crops, 156 gradients,
decode-head BN statistics) and ``{efficient,fcn}_w4_128_hr64_f64.npz`` (weights, input and float64 outputs
of the original's Efficient-HRDecoder and FCN configs at HRNet width 4: every gradient and BN statistic).
"""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hrdecoder_jax import config_utils
from hrdecoder_jax.models import build_model
from hrdecoder_jax.weights import load_torch_weights, torch_name

TOLERANCE = 1e-10   # relative to the largest magnitude of each compared array


def rel_err(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


def nhwc(a):
    return np.transpose(a, (0, 2, 3, 1))


def torch_layout(name, grad):
    """A Flax gradient in the PyTorch layout of ``name`` (conv kernels HWIO -> OIHW)."""
    grad = np.asarray(grad)
    return grad.transpose(3, 2, 0, 1) if grad.ndim == 4 else grad


@pytest.fixture(autouse=True)
def x64():
    with jax.enable_x64(True):
        yield


def run_float64(model_cfg, state_dict, image, label, crop_boxes):
    """Build ``model_cfg`` in float64, load ``state_dict``; return eval logits, the train losses with
    ``crop_boxes``, every gradient by PyTorch name, and the model after the train forward."""
    model_cfg = config_utils.model_config() if model_cfg is None else model_cfg
    model_cfg.dtype = "float64"
    model = build_model(model_cfg, rngs=nnx.Rngs(0))
    report = load_torch_weights(model, state_dict)
    assert not report.missing and not report.unexpected, report.summary()
    assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(nnx.state(model, (nnx.Param, nnx.BatchStat))))
    x = jnp.asarray(nhwc(image))                      # float32 input; a float64 model resizes it in float64
    model.eval()
    logits = nnx.jit(lambda m, a: m(a))(model, x)
    model.train()
    labels = jnp.asarray(label[:, 0].astype(np.int32))
    boxes = None if crop_boxes is None or len(crop_boxes) == 0 else jnp.asarray(crop_boxes.astype(np.int32))

    def loss_fn(m):
        losses = m.train_losses(x, labels, crop_boxes=boxes)
        return losses["total"], losses

    (_, losses), grads = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))(model)
    flat = {torch_name(path): torch_layout(torch_name(path), v[...]) for path, v in nnx.to_flat_state(grads)}
    assert logits.dtype == jnp.float64 and losses["total"].dtype == jnp.float64
    return logits, losses, flat, model


def bn_statistics(model):
    """Running statistics by PyTorch name (``...running_mean`` / ``...running_var``)."""
    return {torch_name(path): np.asarray(v[...]) for path, v in nnx.to_flat_state(nnx.state(model, nnx.BatchStat))}


# --------------------------------------------------------------------------------------------------------
# HRDecoder: the tiny fixture (W18, one module and block per stage, 256 px, hr_scale 128, 120 px crops)
# --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(fixtures_dir):
    io = dict(np.load(fixtures_dir / "tiny_w18_256_hr128_io.npz"))
    ref = dict(np.load(fixtures_dir / "tiny_w18_256_hr128_f64.npz"))
    cfg = config_utils.model_config(width=18, num_modules=(1, 1, 1, 1), num_blocks=1, hr_scale=(128, 128),
                                    crop_num=2)
    with jax.enable_x64(True):
        out = run_float64(cfg, fixtures_dir / "tiny_w18_256_hr128_seed0_state_dict.npz", io["input"],
                          io["train_label"], io["train_crop_boxes"])
    return io, ref, out


def test_hrdecoder_eval_logits_and_losses_are_identical_in_float64(tiny):
    io, ref, (logits, losses, _, _) = tiny
    assert (io["train_crop_boxes"][:, 1] - io["train_crop_boxes"][:, 0] == 120).all()   # non-integer factor
    assert rel_err(logits, nhwc(ref["fused_logits"])) < TOLERANCE
    for ours, theirs in (("hr", "hr.loss_seg"), ("fuse", "fuse.loss_seg"), ("total", "total")):
        assert rel_err(losses[ours], ref[f"train_loss/{theirs}"]) < TOLERANCE, ours


def test_hrdecoder_all_156_gradients_are_identical_in_float64(tiny):
    _, ref, (_, _, grads, _) = tiny
    names = [k[len("train_grad/"):] for k in ref if k.startswith("train_grad/")]
    assert len(names) == 156
    errors = {name: rel_err(grads[name], ref[f"train_grad/{name}"]) for name in names}
    worst = max(errors, key=errors.get)
    assert errors[worst] < TOLERANCE, (worst, errors[worst])


def test_hrdecoder_head_bn_statistics_are_identical_in_float64(tiny):
    _, ref, (_, _, _, model) = tiny
    stats = bn_statistics(model)
    keys = [k for k in ref if k.startswith("train_buffer/")]
    assert len(keys) == 4
    for key in keys:
        assert rel_err(stats[key[len("train_buffer/"):]], ref[key]) < TOLERANCE, key


# --------------------------------------------------------------------------------------------------------
# Efficient-HRDecoder and FCN: fixtures of the original's own configs at HRNet width 4
# --------------------------------------------------------------------------------------------------------


def variant_config(meta):
    common = dict(width=meta["width"], num_modules=(meta["modules"],) * 4, num_blocks=meta["blocks"])
    if meta["config"] == "fcn":
        return config_utils.fcn_baseline_config(**common)
    assert meta["config"] == "efficient"
    return config_utils.model_config(kind="EfficientHRDecoder", visual_dim=meta["visual_dim"], compress=False,
                                     channels=meta["visual_dim"], kernel_size=7, hr_scale=tuple(meta["hr_scale"]),
                                     crop_num=meta["crop_num"], **common)


@pytest.mark.parametrize("name", ["efficient_w4_128_hr64_f64.npz", "fcn_w4_128_hr64_f64.npz"])
def test_variant_is_identical_in_float64(fixtures_dir, name):
    ref = dict(np.load(fixtures_dir / name))
    meta = json.loads(str(ref["meta"]))
    state = {k[len("state/"):]: v for k, v in ref.items() if k.startswith("state/")}
    logits, losses, grads, model = run_float64(variant_config(meta), state, ref["input"], ref["train_label"],
                                               ref["train_crop_boxes"])
    assert rel_err(logits, nhwc(ref["logits"])) < TOLERANCE
    if meta["config"] == "fcn":
        assert rel_err(losses["total"], ref["train_loss/decode.loss_seg"]) < TOLERANCE
    else:
        # 56 px crops: 7 feature cells resized to 16, a non-integer factor (index arithmetic in float64).
        assert (ref["train_crop_boxes"][:, 1] - ref["train_crop_boxes"][:, 0] == 56).all()
        for ours, theirs in (("hr", "hr.loss_seg"), ("fuse", "fuse.loss_seg")):
            assert rel_err(losses[ours], ref[f"train_loss/{theirs}"]) < TOLERANCE, ours
    assert rel_err(losses["total"], ref["train_loss/total"]) < TOLERANCE
    names = [k[len("train_grad/"):] for k in ref if k.startswith("train_grad/")]
    assert set(names) == set(grads)                    # every parameter of the model has its gradient here
    errors = {n: rel_err(grads[n], ref[f"train_grad/{n}"]) for n in names}
    worst = max(errors, key=errors.get)
    assert errors[worst] < TOLERANCE, (worst, errors[worst])
    stats = bn_statistics(model)
    buffers = [k[len("train_buffer/"):] for k in ref if k.startswith("train_buffer/")]
    assert set(buffers) == set(stats)
    errors = {n: rel_err(stats[n], ref[f"train_buffer/{n}"]) for n in buffers}
    worst = max(errors, key=errors.get)
    assert errors[worst] < TOLERANCE, (worst, errors[worst])


def test_float64_model_without_x64_fails_in_one_line():
    cfg = config_utils.model_config(width=4, num_modules=(1, 1, 1, 1), num_blocks=1, hr_scale=(64, 64),
                                    dtype="float64")
    with jax.enable_x64(False):
        with pytest.raises(config_utils.ConfigError, match="JAX_ENABLE_X64=1"):
            build_model(cfg, rngs=nnx.Rngs(0))


def test_one_training_step_runs_in_float64(fixtures_dir):
    """The trainer's own step (``train_step.make_train_step`` + ``optim.make_optimizer``) keeps everything in float64:
    parameters, optimiser state, BN statistics and losses (a float32 image from the pipeline included)."""
    from hrdecoder_jax.optim import make_optimizer
    from hrdecoder_jax.train_step import make_train_step, split_for_training
    ref = dict(np.load(fixtures_dir / "efficient_w4_128_hr64_f64.npz"))
    meta = json.loads(str(ref["meta"]))
    cfg = variant_config(meta)
    cfg.dtype = "float64"
    model = build_model(cfg, rngs=nnx.Rngs(0))
    load_torch_weights(model, {k[len("state/"):]: v for k, v in ref.items() if k.startswith("state/")})
    model.train()
    structure, params, rest = split_for_training(model)
    tx = make_optimizer(config_utils.optimizer_config(), total_steps=10)
    opt_state = tx.init(params)
    step = jax.jit(make_train_step(structure, tx, seed=0))
    images = jnp.asarray(nhwc(ref["input"]))          # float32, as the input pipeline delivers them
    labels = jnp.asarray(ref["train_label"][:, 0].astype(np.int32))
    for i in range(2):
        params, rest, opt_state, metrics = step(params, rest, opt_state, jnp.int32(i), images, labels)
    floats = [x for x in jax.tree.leaves((params, rest, opt_state)) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.float64 for x in floats)
    assert metrics["total"].dtype == jnp.float64 and np.isfinite(float(metrics["total"]))
