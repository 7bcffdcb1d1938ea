"""The oneDNN convolutions (``hrdecoder_jax.ops.conv``): the same function as XLA's convolution, forward and
both gradients, checked against a float64 computation of the same float32 inputs; and the dispatch rules
(float32 NHWC convolutions on CPUs only; float64, bfloat16 and the 'xla' setting keep XLA's)."""
import platform

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hrdecoder_jax import config_utils
from hrdecoder_jax.models import build_model
from hrdecoder_jax.ops import conv as C

DN = ("NHWC", "HWIO", "NHWC")
ONEDNN_PLATFORM = platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")

pytestmark = pytest.mark.skipif(not ONEDNN_PLATFORM, reason="the oneDNN wheels exist for Linux x86_64 only")


@pytest.fixture
def backend():
    """Set the convolution backend for one test and restore the previous one."""
    before = C.backend()
    yield C.set_backend
    C.set_backend(before)


def test_the_library_builds_and_loads():
    assert C.available(), C.load_error()


def _xla64(x, k, strides, padding):
    with jax.enable_x64():
        x64, k64 = jnp.asarray(np.asarray(x, np.float64)), jnp.asarray(np.asarray(k, np.float64))

        def f(a, b):
            return jax.lax.conv_general_dilated(a, b, strides, padding, dimension_numbers=DN)

        y, vjp = jax.vjp(f, x64, k64)
        dy = jnp.asarray(np.cos(np.arange(y.size, dtype=np.float64)).reshape(y.shape))
        dx, dk = vjp(dy)
        return np.asarray(y), np.asarray(dx), np.asarray(dk), np.asarray(dy, np.float32)


# (batch, height, width, in, out, kernel, stride, padding): HRNet's and the head's kinds, odd sizes, one-sided
# and asymmetric padding.
CASES = [
    (1, 16, 16, 8, 8, 3, 1, ((1, 1), (1, 1))),
    (2, 17, 13, 5, 7, 3, 2, ((1, 1), (1, 1))),
    (3, 12, 10, 6, 6, 1, 1, ((0, 0), (0, 0))),
    (2, 14, 14, 16, 4, 7, 1, ((3, 3), (3, 3))),
    (1, 9, 11, 4, 3, 3, 2, ((1, 0), (0, 2))),
    (1, 8, 8, 144, 72, 1, 1, ((0, 0), (0, 0))),
]


@pytest.mark.parametrize("n,h,w,ci,co,ks,s,pad", CASES)
def test_forward_and_gradients_equal_a_float64_convolution(n, h, w, ci, co, ks, s, pad):
    assert C.available(), C.load_error()
    rng = np.random.default_rng(n * 1000 + h * 10 + ks)
    x = rng.standard_normal((n, h, w, ci)).astype(np.float32)
    k = rng.standard_normal((ks, ks, ci, co)).astype(np.float32)
    y64, dx64, dk64, dy = _xla64(x, k, (s, s), pad)

    f = jax.jit(lambda a, b: C.onednn_conv(a, b, (s, s), pad))
    y, vjp = jax.vjp(f, jnp.asarray(x), jnp.asarray(k))
    dx, dk = vjp(jnp.asarray(dy))
    for name, got, want in (("y", y, y64), ("dx", dx, dx64), ("dk", dk, dk64)):
        assert got.shape == want.shape, name
        rel = float(np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max())
        # float32 rounding of sums of at most ks*ks*ci (forward, input gradient) or n*h*w (kernel
        # gradient) products of unit-size numbers: a few float32 ulps of the largest output.
        assert rel < 2e-6, (name, rel)


def _lowered_text(fn, *args):
    # A fresh function each time: jit's cache would return an earlier trace of ``fn`` (made under another
    # backend setting; the setting applies to functions traced after it).
    return jax.jit(lambda *a: fn(*a)).lower(*args).as_text()


def test_dispatch_sends_only_float32_nhwc_convolutions_on_cpus(backend):
    x32 = jnp.ones((1, 8, 8, 4), jnp.float32)
    k32 = jnp.ones((3, 3, 4, 4), jnp.float32)

    def conv(a, b, **kw):
        return C.conv_general_dilated(a, b, (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN, **kw)

    backend("onednn")
    assert "hrd_conv_fwd" in _lowered_text(conv, x32, k32)
    grad_text = _lowered_text(jax.grad(lambda a, b: conv(a, b).sum(), (0, 1)), x32, k32)
    assert "hrd_conv_bwd_data" in grad_text and "hrd_conv_bwd_weights" in grad_text
    # Not sent: bfloat16, dilation, groups, string padding, other layouts.
    assert "hrd_conv" not in _lowered_text(conv, x32.astype(jnp.bfloat16), k32.astype(jnp.bfloat16))
    assert "hrd_conv" not in _lowered_text(lambda a, b: conv(a, b, rhs_dilation=(2, 2)), x32, k32)
    assert "hrd_conv" not in _lowered_text(
        lambda a, b: C.conv_general_dilated(a, b, (1, 1), "SAME", dimension_numbers=DN), x32, k32)
    assert "hrd_conv" not in _lowered_text(
        lambda a, b: C.conv_general_dilated(a, b[:, :, :2, :], (1, 1), ((1, 1), (1, 1)), dimension_numbers=DN,
                                            feature_group_count=2), x32, k32)
    backend("xla")
    assert "hrd_conv" not in _lowered_text(conv, x32, k32)
    with jax.enable_x64():
        backend("onednn")
        assert "hrd_conv" not in _lowered_text(conv, x32.astype(jnp.float64), k32.astype(jnp.float64))


def test_auto_uses_onednn_only_on_one_device(backend):
    """The tests run with 4 CPU devices: 'auto' keeps XLA's convolutions there (a custom call is not
    partitioned over a sharded batch; it would be gathered onto every device)."""
    backend("auto")
    x, k = jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 4, 4))
    text = _lowered_text(lambda a, b: C.conv_general_dilated(a, b, (1, 1), ((1, 1), (1, 1)),
                                                             dimension_numbers=DN), x, k)
    assert jax.device_count() > 1 and "hrd_conv" not in text


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="onednn"):
        C.set_backend("mkl")


def _tiny_run(dtype, images, labels, boxes):
    cfg = config_utils.model_config(width=18, num_modules=(1, 1, 1, 1), num_blocks=1, hr_scale=(64, 64),
                                    crop_num=2, dtype=dtype)
    model = build_model(cfg, rngs=nnx.Rngs(0))
    images = images.astype(dtype)
    model.eval()
    logits = nnx.jit(lambda m, x: m(x))(model, images)
    model.train()

    @nnx.jit
    def loss_and_grad(m):
        return nnx.value_and_grad(lambda mm: mm.train_losses(images, labels, crop_boxes=boxes)["total"])(m)

    loss, grads = loss_and_grad(model)
    return (np.asarray(logits, np.float64), float(loss),
            [np.asarray(g, np.float64) for g in jax.tree.leaves(nnx.to_pure_dict(grads))])


def test_model_with_onednn_is_float32_rounding_away_from_float64(backend):
    """The tiny W18 HRDecoder (eval logits, train loss, all gradients) in float32 with oneDNN's and with XLA's
    convolutions, each against the same model in float64. Both are float32 rounding away from it.

    oneDNN sums each output's products in sequence (as PyTorch's CPU convolutions, which use it, do); XLA's
    Eigen path sums in blocks: oneDNN's float32 error is about 1.5x Eigen's here (measured: logits 1.3e-6 vs
    1.1e-6, loss 4.8e-8 vs 4.9e-8, worst of 156 gradients 7.3e-5 vs 3.5e-5; median gradient 3.1e-5 vs
    2.2e-5), and a single 7x7 convolution of 3136 products is 2.8e-6 off against Eigen's 4.7e-7. The bounds
    are float32-sized and far below any real difference (a wrong padding or stride is O(1))."""
    images = jnp.asarray(np.random.default_rng(0).standard_normal((1, 128, 128, 3)), jnp.float32)
    labels = jnp.asarray(np.random.default_rng(1).integers(0, 5, (1, 128, 128)), jnp.int32)
    boxes = jnp.array([[0, 64, 8, 72], [32, 96, 40, 104]], jnp.int32)
    with jax.enable_x64():
        truth = _tiny_run("float64", images, labels, boxes)
    for name in ("xla", "onednn"):
        backend(name)
        logits, loss, grads = _tiny_run("float32", images, labels, boxes)
        assert len(grads) == len(truth[2]) > 100
        assert np.abs(logits - truth[0]).max() / np.abs(truth[0]).max() < 1e-5, name
        assert abs(loss - truth[1]) / abs(truth[1]) < 1e-6, name
        worst = max(np.abs(g - t).max() / max(np.abs(t).max(), 1e-30) for g, t in zip(grads, truth[2]))
        assert worst < 2e-4, (name, worst)
