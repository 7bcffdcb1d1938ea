"""The compiled CPU kernels (``hrdecoder_jax.ops``): oneDNN convolutions and the batch-norm reductions are the
same functions as XLA's, forward and gradients, checked against float64 computations of the same float32
inputs; the dispatch rules (float32 on CPUs only; float64, bfloat16 and the 'xla' setting keep XLA's)."""
import platform

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hrdecoder_jax import config_utils
from hrdecoder_jax.models import build_model
from hrdecoder_jax.ops import batch_norm as BN, conv as C, library

DN = ("NHWC", "HWIO", "NHWC")
ONEDNN_PLATFORM = platform.system() == "Linux" and platform.machine() in ("x86_64", "AMD64")

pytestmark = pytest.mark.skipif(not ONEDNN_PLATFORM, reason="the oneDNN wheels exist for Linux x86_64 only")


@pytest.fixture
def backend():
    """Set the CPU kernel backend for one test and restore the previous one."""
    before = library.backend()
    yield library.set_backend
    library.set_backend(before)


def test_the_library_builds_and_loads():
    assert library.available(), library.load_error()


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
    assert library.available(), library.load_error()
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

    backend("native")
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
        backend("native")
        assert "hrd_conv" not in _lowered_text(conv, x32.astype(jnp.float64), k32.astype(jnp.float64))


def test_auto_uses_the_kernels_only_on_one_device(backend):
    """The tests run with 4 CPU devices: 'auto' keeps XLA's convolutions there (a custom call is not
    partitioned over a sharded batch; it would be gathered onto every device)."""
    backend("auto")
    x, k = jnp.ones((1, 8, 8, 4)), jnp.ones((3, 3, 4, 4))
    text = _lowered_text(lambda a, b: C.conv_general_dilated(a, b, (1, 1), ((1, 1), (1, 1)),
                                                             dimension_numbers=DN), x, k)
    assert jax.device_count() > 1 and "hrd_conv" not in text


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="native"):
        library.set_backend("mkl")


def _bn64(x, scale, bias, rm, rv, dy):
    """Batch norm (momentum 0.9, eps 1e-5) and its VJP in float64 (plain JAX), the truth for the kernels."""
    with jax.enable_x64():
        args = [jnp.asarray(np.asarray(a, np.float64)) for a in (x, scale, bias, rm, rv)]
        (y, nm, nv), vjp = jax.vjp(lambda *a: BN._plain(*a, 1e-5, 0.9), *args)
        grads = vjp((jnp.asarray(np.asarray(dy, np.float64)), jnp.zeros_like(nm), jnp.zeros_like(nv)))
        return [np.asarray(v) for v in (y, nm, nv, *grads[:3])]


@pytest.mark.parametrize("shape", [(1, 64, 64, 18), (4, 16, 16, 64), (2, 5, 3, 7), (2, 3, 1, 5)])
def test_batch_norm_kernels_equal_float64_batch_norm(shape, backend):
    rng = np.random.default_rng(sum(shape))
    # An offset much larger than the spread: a one-pass sum of squares in float32 would lose the variance.
    x = (rng.standard_normal(shape) * 0.5 + 30.0).astype(np.float32)
    c = shape[-1]
    scale, bias = rng.uniform(0.5, 2, c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    rm, rv = rng.standard_normal(c).astype(np.float32), rng.uniform(0.5, 2, c).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    truth = _bn64(x, scale, bias, rm, rv, dy)
    names = ("y", "running mean", "running var", "dx", "dscale", "dbias")
    errors = {}
    for kind in ("xla", "native"):
        backend(kind)
        f = jax.jit(lambda *a: BN.batch_norm_train(*a, 1e-5, 0.9))
        assert ("hrd_bn_moments" in f.lower(x, scale, bias, rm, rv).as_text()) == (kind == "native")
        (y, nm, nv), vjp = jax.vjp(f, x, scale, bias, rm, rv)
        dx, dscale, dbias, drm, drv = vjp((jnp.asarray(dy), jnp.zeros_like(nm), jnp.zeros_like(nv)))
        assert not np.any(np.asarray(drm)) and not np.any(np.asarray(drv))   # no gradient into running stats
        errors[kind] = [float(np.abs(np.asarray(got, np.float64) - want).max() / max(np.abs(want).max(), 1e-30))
                        for got, want in zip((y, nm, nv, dx, dscale, dbias), truth)]
    # As close to float64 as XLA's own float32 batch norm (whose error here comes from rounding x - mean
    # with x near 30: a float32 ulp of 30 is 1.9e-6), and float32-close in absolute terms.
    for name, e_native, e_xla in zip(names, errors["native"], errors["xla"]):
        assert e_native <= 2 * e_xla + 2e-7 and e_native < 2e-5, (name, e_native, e_xla)


def test_batch_norm_statistics_by_hand(backend):
    """Two channels over four pixels: channel 0 is (-0.5, 1.5, 2, 1), mean 1, biased variance
    (2.25 + 0.25 + 1 + 0) / 4 = 0.875, unbiased 7/6; channel 1 is (7, 9, 11, 13), mean 10, variance 5,
    unbiased 20/3. Running statistics from 0 and 1 with momentum 0.9: 0.1 * mean, 0.9 + 0.1 * unbiased.
    With dy = (1, 0, 0, 0) and (0, 1, 1, 0): dbias = (1, 2), dscale = sum dy (x - mean) / std
    = (-1.5 / sqrt(0.875), 0); y = (x - mean) / std."""
    x = jnp.asarray(np.array([[-0.5, 7], [1.5, 9], [2, 11], [1, 13]], np.float32).reshape(1, 2, 2, 2))
    dy = jnp.asarray(np.array([[1, 0], [0, 1], [0, 1], [0, 0]], np.float32).reshape(1, 2, 2, 2))
    ones, zeros = jnp.ones(2), jnp.zeros(2)
    backend("native")
    y, nm, nv = jax.jit(lambda a: BN.batch_norm_train(a, ones, zeros, zeros, ones, 0.0, 0.9))(x)
    np.testing.assert_allclose(np.asarray(nm), [0.1, 1.0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(nv), [0.9 + 0.1 * 7 / 6, 0.9 + 0.1 * 20 / 3], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(y)[0, 0, 0], [-1.5 / np.sqrt(0.875), -3 / np.sqrt(5)], rtol=1e-6)
    _, vjp = jax.vjp(lambda sc, b: BN.batch_norm_train(x, sc, b, zeros, ones, 0.0, 0.9)[0], ones, zeros)
    dscale, dbias = vjp(dy)
    np.testing.assert_allclose(np.asarray(dbias), [1.0, 2.0], rtol=1e-7)
    np.testing.assert_allclose(np.asarray(dscale), [-1.5 / np.sqrt(0.875), 0.0], rtol=1e-6, atol=1e-7)


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


def test_model_with_native_kernels_is_float32_rounding_away_from_float64(backend):
    """The tiny W18 HRDecoder (eval logits, train loss, all gradients) in float32 with the compiled kernels
    (oneDNN convolutions, batch-norm reductions) and with XLA's operations, each against the same model in
    float64. Both are float32 rounding away from it.

    The gradients are compared as one vector (relative L2 error): float32 rounding can flip the sign of a
    batch-norm output that is within rounding of zero, and its ReLU then passes (or stops) that element's
    gradient where float64 does the opposite, which moves the gradient of every layer before it by up to 1e-2
    at single elements. Measured over five inputs, such a flip happened for 2 of 5 with the kernels (one
    element of 65,536; L2 error 9e-4 and 3e-4) and 0 of 5 with XLA's Eigen path: oneDNN sums each output's
    products in sequence, like PyTorch's CPU convolutions, and its forward is about 6x further from float64
    than Eigen's blocked sums on the head's 7x7 convolution (2.8e-6 vs 4.7e-7), so near-zero outputs flip more
    often. Without a flip both are at 1e-5 (L2). A real difference (a wrong padding, stride or formula) is O(1)."""
    boxes = jnp.array([[0, 64, 8, 72], [32, 96, 40, 104]], jnp.int32)
    for seed in (0, 1):      # input 0 has a flip with the kernels, input 1 has none
        images = jnp.asarray(np.random.default_rng(seed).standard_normal((1, 128, 128, 3)), jnp.float32)
        labels = jnp.asarray(np.random.default_rng(seed + 100).integers(0, 5, (1, 128, 128)), jnp.int32)
        with jax.enable_x64():
            truth = _tiny_run("float64", images, labels, boxes)
        for name in ("xla", "native"):
            backend(name)
            logits, loss, grads = _tiny_run("float32", images, labels, boxes)
            assert len(grads) == len(truth[2]) > 100
            assert np.abs(logits - truth[0]).max() / np.abs(truth[0]).max() < 1e-5, (seed, name)
            assert abs(loss - truth[1]) / abs(truth[1]) < 1e-6, (seed, name)
            l2 = np.sqrt(sum(((g - t) ** 2).sum() for g, t in zip(grads, truth[2]))
                         / sum((t ** 2).sum() for t in truth[2]))
            assert l2 < 2e-3, (seed, name, l2)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_fused_optimizer_step_is_optax(name, backend):
    """Five steps of the fused optimiser step (custom calls over groups of tensors, in place) against optax's
    own on XLA, each step from optax's previous parameters and state: optax's state structure (checkpoints
    and resumes are unchanged); SGD bit for bit; AdamW's state to 2 ulp and its parameters to 2 ulp of the
    larger of the previous parameter and the step (XLA and the compiler both contract a * b + c into fused
    multiply-adds, and for AdamW's two-product sums they pick different products; where the step cancels
    most of the parameter, that rounding is many ulp of the small result); the gradient norm to float32
    rounding (summed in double there)."""
    from hrdecoder_jax import optim
    opt = config_utils.optimizer_config()
    opt.update(name=name, lr=0.05, warmup_steps=2)
    tx = optim.make_optimizer(opt, total_steps=10)
    rng = np.random.default_rng(3)
    params = {"conv": {"kernel": rng.standard_normal((3, 3, 4, 5)).astype(np.float32)},
              "bn": {"scale": rng.uniform(0.5, 1.5, 5).astype(np.float32), "bias": np.zeros(5, np.float32)},
              "head": [rng.standard_normal((7,)).astype(np.float32)],
              # more tensors than one custom call takes (optim._GROUP): several calls, one global norm
              "blocks": [rng.standard_normal((int(rng.integers(1, 20)),)).astype(np.float32) for _ in range(70)]}
    params = jax.tree.map(jnp.asarray, params)
    grads_seq = [jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape).astype(np.float32)), params)
                 for _ in range(5)]

    def make_step(kind):
        backend(kind)
        step = jax.jit(lambda p, s, g: optim.apply_gradients(tx, g, s, p))
        text = step.lower(params, tx.init(params), grads_seq[0]).as_text()
        assert text.count(f"hrd_{name}_step") == (3 if kind == "native" else 0)   # 73 tensors, 32 per call
        return step

    xla_step, native_step = make_step("xla"), make_step("native")
    p, s = params, tx.init(params)
    for g in grads_seq:
        p_x, s_x, n_x = xla_step(p, s, g)
        p_n, s_n, n_n = native_step(p, s, g)
        assert jax.tree.structure(s_x) == jax.tree.structure(s_n)
        for a, b in zip(jax.tree.leaves(s_x), jax.tree.leaves(s_n)):
            np.testing.assert_array_max_ulp(np.asarray(a), np.asarray(b), maxulp=0 if name == "sgd" else 2)
        for a, b, before in zip(jax.tree.leaves(p_x), jax.tree.leaves(p_n), jax.tree.leaves(p)):
            a, b, before = np.asarray(a), np.asarray(b), np.asarray(before)
            if name == "sgd":
                np.testing.assert_array_equal(a, b)
            else:
                bound = 2 * np.spacing(np.maximum(np.abs(before), np.abs(a - before)))
                assert (np.abs(a - b) <= bound).all(), np.abs(a - b).max()
        np.testing.assert_allclose(float(n_n), float(n_x), rtol=1e-6)
        p, s = p_x, s_x
    moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(jax.tree.leaves(p),
                                                                                 jax.tree.leaves(params)))
    assert moved > 1e-3        # the steps did something


@pytest.mark.parametrize("src,dst", [((8, 8), (16, 16)), ((16, 16), (64, 64)), ((512, 512), (256, 256)),
                                     ((32, 48), (64, 40)), ((64, 64), (512, 512)), ((5, 7), (13, 3))])
def test_resize_kernel_equals_float64_pytorch_rule(src, dst, backend):
    """The resize kernel (forward and transpose) against PyTorch's bilinear rule for float32 data (indices and
    weights in float32, as PyTorch computes them) applied in float64 as dense matrices, on HRNet's integer
    factors and others."""
    from hrdecoder_jax.models.resize import _dense, resize_bilinear, source_indices_host
    rng = np.random.default_rng(src[0] * 100 + dst[1])
    x = rng.standard_normal((2, *src, 3)).astype(np.float32)
    g = rng.standard_normal((2, *dst, 3)).astype(np.float32)
    mh, mw = (_dense(n, *source_indices_host(n, m, "float32")).astype(np.float64) for n, m in zip(src, dst))
    y64 = np.einsum("oh,nhwc,pw->nopc", mh, x.astype(np.float64), mw)
    dx64 = np.einsum("oh,nopc,pw->nhwc", mh, g.astype(np.float64), mw)
    backend("native")
    f = jax.jit(lambda a: resize_bilinear(a, dst))
    assert "hrd_resize" in f.lower(x).as_text()
    y, vjp = jax.vjp(f, jnp.asarray(x))
    (dx,) = vjp(jnp.asarray(g))
    # Two weighted sums per output: a few float32 steps of the largest value.
    assert np.abs(np.asarray(y, np.float64) - y64).max() <= 4 * np.finfo(np.float32).eps * np.abs(y64).max()
    # The transpose sums up to 4 * ceil(out / in)^2 weighted terms per input.
    assert np.abs(np.asarray(dx, np.float64) - dx64).max() <= 32 * np.finfo(np.float32).eps * np.abs(dx64).max()
