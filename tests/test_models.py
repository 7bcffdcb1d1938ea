"""Parity of the Flax model with the PyTorch reference fixtures, weight import, and the one-compile train step.

Fixture: ``tiny_w18_256_hr128`` (W18, one module and one block per stage, 256 x 256 input, hr_scale 128);
its README states the expected float32 agreement (about 1e-5 relative for activations and losses).
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from helpers import draw_crop_boxes
from hrdecoder_jax import config_utils
from hrdecoder_jax.models import build_model, count_params, slide_windows
from hrdecoder_jax.models.resize import crop_resize_bilinear, resize_bilinear, upsample_to_box
from hrdecoder_jax.weights import load_torch_weights

STATE_NPZ = "tiny_w18_256_hr128_seed0_state_dict.npz"
STATE_PTH = "tiny_w18_256_hr128_seed0_state_dict.pth"


def tiny_config(dtype="float32"):
    return config_utils.model_config(width=18, num_modules=(1, 1, 1, 1), num_blocks=1, hr_scale=(128, 128),
                                     crop_num=2, dtype=dtype)


def nhwc(a):
    return np.transpose(a, (0, 2, 3, 1))


def rel_err(actual, expected):
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    return float(np.abs(actual - expected).max() / np.abs(expected).max())


@pytest.fixture(scope="module")
def io(fixtures_dir):
    return dict(np.load(fixtures_dir / "tiny_w18_256_hr128_io.npz"))


@pytest.fixture(scope="module")
def eval_model(fixtures_dir):
    model = build_model(tiny_config(), rngs=nnx.Rngs(0))
    report = load_torch_weights(model, fixtures_dir / STATE_NPZ)
    assert not report.missing and not report.unexpected
    model.eval()
    return model


def test_parameter_count_matches_fixture(io, eval_model):
    import json
    assert count_params(eval_model) == json.loads(str(io["meta"]))["num_params"] == 1527520


def test_eval_forward_matches_reference(io, eval_model):
    x = jnp.asarray(nhwc(io["input"]))
    lr = resize_bilinear(x, (128, 128))
    assert rel_err(lr, nhwc(io["lr_input"])) < 1e-6
    for i, feat in enumerate(nnx.jit(lambda m, a: m.backbone(a))(eval_model, lr)):
        assert rel_err(feat, nhwc(io[f"feat{i}"])) < 1e-5, f"feat{i}"
    lr_feat, lr_logits, windows, fused, call = nnx.jit(lambda m, x: (
        m.extract_lr_features(x), m.decode_head(m.extract_lr_features(x)),
        m.predict_parts(x)["window_logits"], m.predict_parts(x)["fused"], m(x)))(eval_model, x)
    assert rel_err(lr_feat, nhwc(io["lr_feat"])) < 1e-5
    assert rel_err(lr_logits, nhwc(io["lr_logits"])) < 1e-5
    assert [list(b) for b in slide_windows((256, 256), (128, 128), (128, 128))] == io["crop_boxes"].tolist()
    assert rel_err(windows, np.transpose(io["crop_logits"], (0, 1, 3, 4, 2))) < 1e-5
    assert rel_err(fused, nhwc(io["fused_logits"])) < 1e-5
    assert rel_err(call, nhwc(io["fused_logits"])) < 1e-5


def test_reference_crop_draw_is_reproduced(io):
    """The host-side draw replays NumPy's legacy generator call for call, as the reference does."""
    rng = np.random.RandomState(int(io["train_np_seed"]))
    boxes = draw_crop_boxes(rng, (256, 256), (128, 128), (0.75, 1.25), 8, 2)
    np.testing.assert_array_equal(boxes, io["train_crop_boxes"])
    assert boxes[0, 1] - boxes[0, 0] == io["train_hr_scale"][0, 0]


def _train_losses_and_grads(fixtures_dir, io, dtype):
    model = build_model(tiny_config(dtype), rngs=nnx.Rngs(0))
    load_torch_weights(model, fixtures_dir / STATE_NPZ)
    if dtype == "float64":
        state = nnx.state(model)
        nnx.update(model, jax.tree.map(lambda a: a.astype(jnp.float64) if a.dtype == jnp.float32 else a, state))
    model.train()
    x = jnp.asarray(nhwc(io["input"]), dtype)
    labels = jnp.asarray(io["train_label"][:, 0].astype(np.int32))
    boxes = jnp.asarray(io["train_crop_boxes"].astype(np.int32))

    def loss_fn(m):
        losses = m.train_losses(x, labels, crop_boxes=boxes)
        return losses["total"], losses

    (_, losses), grads = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))(model)
    flat = {".".join(map(str, p)): v[...] for p, v in nnx.to_flat_state(grads)}
    return model, losses, flat


GRAD_KEYS = {"decode_head.conv_seg.weight": "decode_head.conv_seg.kernel",
             "decode_head.conv_seg.bias": "decode_head.conv_seg.bias",
             "decode_head.convs.0.conv.weight": "decode_head.convs.0.conv.kernel",
             "backbone.conv1.weight": "backbone.conv1.kernel"}


def _ref_grad(io, name):
    g = io[f"train_grad/{name}"]
    return g.transpose(2, 3, 1, 0) if g.ndim == 4 else g


@pytest.fixture(scope="module")
def train_f32(fixtures_dir, io):
    return _train_losses_and_grads(fixtures_dir, io, "float32")


def test_training_losses_and_bn_statistics_match_reference(io, train_f32):
    model, losses, flat = train_f32
    assert rel_err(losses["hr"], io["train_loss/hr.loss_seg"]) < 1e-5
    assert rel_err(losses["fuse"], io["train_loss/fuse.loss_seg"]) < 1e-5
    assert rel_err(losses["total"], io["train_loss/total"]) < 1e-5
    assert set(losses) == {"hr", "fuse", "total"}          # lr_loss_weight = 0: no 'lr' term
    # Running statistics after three head calls (LR, HR crops, windows), with PyTorch's unbiased variance.
    for i in (0, 1):
        bn = model.decode_head.convs[i].bn
        assert rel_err(bn.mean[...], io[f"train_buffer/decode_head.convs.{i}.bn.running_mean"]) < 1e-5
        assert rel_err(bn.var[...], io[f"train_buffer/decode_head.convs.{i}.bn.running_var"]) < 1e-5
    # The four recorded gradients agree in float32 as the fixture README states (measured: <= 5.2e-6).
    for name, key in GRAD_KEYS.items():
        assert rel_err(flat[key], _ref_grad(io, name)) < 1e-4, name


def test_training_gradients_match_reference_in_float64(fixtures_dir, io):
    """The same computation in float64 sits within 1e-4 of the reference gradients (measured: <= 3.3e-6),
    which separates the model's maths from float32 rounding of the convolution kernels."""
    with jax.enable_x64(True):
        _, losses64, flat64 = _train_losses_and_grads(fixtures_dir, io, "float64")
        assert losses64["total"].dtype == jnp.float64
        for name, key in GRAD_KEYS.items():
            assert rel_err(flat64[key], _ref_grad(io, name)) < 1e-4, name


def test_traced_crop_resize_equals_static_crop_then_resize():
    """The one-compile crop (traced size and offset) equals PyTorch's crop-then-resize for IDRiD's extremes:
    feature crops of 90..149 cells of a 240 map at the largest offsets, resized to 240."""
    rng = np.random.default_rng(0)
    feat = jnp.asarray(rng.standard_normal((1, 240, 240, 3)), jnp.float32)
    torch = pytest.importorskip("torch")
    fn = jax.jit(lambda f, b: crop_resize_bilinear(f, b, (240, 240)))
    for k, y0, x0 in [(90, 149, 0), (149, 0, 90), (120, 60, 33), (149, 90, 90)]:
        out = fn(feat, jnp.array([y0, y0 + k, x0, x0 + k]))
        crop = torch.from_numpy(np.asarray(feat)).permute(0, 3, 1, 2)[:, :, y0:y0 + k, x0:x0 + k]
        expected = torch.nn.functional.interpolate(crop, (240, 240), mode="bilinear").permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(out, expected, rtol=0, atol=1e-6)
        static = jax.jit(lambda f: resize_bilinear(f[:, y0:y0 + k, x0:x0 + k], (240, 240)))(feat)
        np.testing.assert_allclose(out, static, rtol=0, atol=1e-6)
    assert fn._cache_size() == 1
    up = jax.jit(lambda x, s: upsample_to_box(x, s, (1192, 1192)))
    small = jnp.asarray(rng.standard_normal((1, 24, 24, 2)), jnp.float32)
    for s in (720, 1192, 904):
        canvas, mask = up(small, jnp.array([s, s]))
        expected = torch.nn.functional.interpolate(torch.from_numpy(np.asarray(small)).permute(0, 3, 1, 2), (s, s),
                                                   mode="bilinear").permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(canvas[:, :s, :s], expected, atol=1e-6)
        assert int(mask.sum()) == s * s
    assert up._cache_size() == 1


def test_head_on_resized_crops_equals_head_after_projection():
    """The HR paths crop the head's 1x1 projection instead of the 720-channel features: in train mode (batch
    statistics) and in eval mode, head(crop_resize(x)) == from_projected(crop_resize(project(x))), and the
    crops carry ``channels`` instead of ``in_channels`` values per pixel."""
    from hrdecoder_jax.models.head import FCNHead
    head = FCNHead(in_channels=40, channels=8, kernel_size=3, num_convs=1, compress=True, concat_input=False,
                   dropout_ratio=-1, rngs=nnx.Rngs(0))
    assert head.linear_stem
    x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 24, 24, 40)), jnp.float32)
    box = jnp.array([3, 17, 5, 19])
    for train in (True, False):
        head.train() if train else head.eval()
        direct = head(crop_resize_bilinear(x, box, (24, 24)))
        proj = crop_resize_bilinear(head.project(x), box, (24, 24))
        assert proj.shape[-1] == 8
        np.testing.assert_allclose(head.from_projected(proj), direct, rtol=0, atol=2e-5)
    plain = FCNHead(in_channels=40, channels=8, kernel_size=3, num_convs=1, compress=True, concat_input=True,
                    dropout_ratio=-1, rngs=nnx.Rngs(0))
    assert not plain.linear_stem and plain.project(x) is x   # conv_cat needs the raw input: no shortcut


def test_idrid_crop_draws_fit_the_canvas():
    """All 60 IDRiD crop sizes (720..1192) with their offsets stay inside the image and the fixed canvas."""
    cfg = config_utils.model_config()
    model = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
    assert model.max_crop_size == (1192, 1192) and model.grid((1920, 1920)) == (8, 8)
    rng = np.random.RandomState(0)
    sizes = set()
    for _ in range(3000):
        boxes = draw_crop_boxes(rng, (1920, 1920), (960, 960), (0.75, 1.25), 8, 2)
        s = boxes[0, 1] - boxes[0, 0]
        sizes.add(int(s))
        assert s <= 1192 and (boxes[:, [1, 3]] <= 1920 - 8).all() and (boxes % 8 == 0).all()
    assert sizes == set(range(720, 1193, 8))
    # In-graph draws obey the same rules.
    draws = jax.vmap(lambda k: model.sample_crop_boxes(k, (1920, 1920)))(jax.random.split(jax.random.PRNGKey(0), 500))
    s = np.asarray(draws[:, 0, 1] - draws[:, 0, 0])
    assert s.min() >= 720 and s.max() <= 1192 and (np.asarray(draws) % 8 == 0).all()
    assert (np.asarray(draws[:, :, [1, 3]]) <= 1920 - 8).all()


def test_train_step_compiles_once_for_all_crop_draws():
    """20+ steps with different random crop sizes and offsets run through one compiled step."""
    from hrdecoder_jax.train_step import make_train_step, split_for_training
    cfg = config_utils.model_config(width=8, num_modules=(1, 1, 1, 1), num_blocks=1, hr_scale=(64, 64),
                                    crop_num=2, channels=8, kernel_size=3)
    model = build_model(cfg, rngs=nnx.Rngs(0))
    model.train()
    structure, params, rest = split_for_training(model)
    tx = optax.sgd(1e-3)
    opt_state = tx.init(params)
    traces = []
    step_fn = make_train_step(structure, tx, seed=0)
    jitted = jax.jit(lambda *a: (traces.append(1), step_fn(*a))[1], donate_argnums=(0, 1, 2))
    rng = np.random.default_rng(0)
    images = jnp.asarray(rng.standard_normal((1, 128, 128, 3)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 5, (1, 128, 128)), jnp.int32)
    sizes = set()
    for step in range(20):
        boxes = model.sample_crop_boxes(jax.random.fold_in(jax.random.PRNGKey(0), step), (128, 128))
        sizes.add(int(boxes[0, 1] - boxes[0, 0]))
        params, rest, opt_state, metrics = jitted(params, rest, opt_state, jnp.int32(step), images, labels)
        assert np.isfinite(float(metrics["total"]))
    assert len(sizes) > 3          # the draws really differed
    assert len(traces) == 1 and jitted._cache_size() == 1


def test_bad_model_settings_fail_with_field_names():
    cfg = config_utils.model_config(hr_scale=(1000, 1000))
    with pytest.raises(config_utils.ConfigError, match="hr_scale"):
        config_utils.validate_model_config(cfg, (1920, 1920))
    cfg = config_utils.model_config()
    with pytest.raises(config_utils.ConfigError, match="data.crop_size"):
        config_utils.validate_model_config(cfg, (1900, 1920))
    cfg = config_utils.model_config()
    cfg.decode_head.in_channels = 700
    with pytest.raises(config_utils.ConfigError, match="in_channels"):
        config_utils.validate_model_config(cfg, (1920, 1920))
    with pytest.raises(config_utils.ConfigError, match="model.type"):
        build_model(config_utils.model_config(kind="Unet"), rngs=nnx.Rngs(0))


@pytest.mark.parametrize("section,key", [("decode_head", "num_convs"), ("decode_head", "concat_input"),
                                         ("decode_head", "dropout_ratio"), ("hr_settings", "crop_num"),
                                         ("decode_head", "loss_smooth"), (None, "dtype")])
def test_a_missing_model_key_is_an_error_not_another_default(section, key):
    """mmseg's class defaults (crop_num 4, num_convs 2, concat_input, dropout 0.1) differ from the paper's;
    the config builders are the one source of defaults, so a config without the key must not build."""
    cfg = config_utils.model_config(width=8, num_modules=(1, 1, 1, 1), num_blocks=1, hr_scale=(64, 64))
    with cfg.unlocked():
        del (cfg[section] if section else cfg)[key]
    with pytest.raises(config_utils.ConfigError, match=key):
        build_model(cfg, rngs=nnx.Rngs(0))


def test_efficient_and_fcn_forward_shapes():
    eff = config_utils.model_config(kind="EfficientHRDecoder", visual_dim=16, compress=False, width=8,
                                    num_modules=(1, 1, 1, 1), num_blocks=1, hr_scale=(64, 64), channels=8,
                                    kernel_size=3)
    model = build_model(eff, rngs=nnx.Rngs(0))
    assert model.multiscale_compressor is not None and model.decode_head.convs[0].conv.in_features == 16
    x = jnp.zeros((1, 128, 128, 3))
    model.eval()
    assert nnx.jit(lambda m, a: m(a))(model, x).shape == (1, 128, 128, 4)
    fcn = build_model(config_utils.fcn_baseline_config(width=8, num_modules=(1, 1, 1, 1), num_blocks=1),
                      rngs=nnx.Rngs(0))
    fcn.train()
    losses = nnx.jit(lambda m, a: m.train_losses(a, jnp.zeros((1, 128, 128), jnp.int32)))(fcn, x)
    assert set(losses) == {"seg", "total"} and np.isfinite(float(losses["total"]))
