"""Slide-window blending: ``model.test_cfg.weighting`` 'uniform' (the reference) and 'gaussian' (MONAI)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hrdecoder_jax import config_utils
from hrdecoder_jax.config_utils import ConfigError
from hrdecoder_jax.inference import gaussian_importance_map, inference


def _window_field_forward(field, proj):
    """A fake model whose logits depend on the window's content (``crops @ proj``) and on the position inside
    the window (``field``), so that overlapping windows disagree, as a real model's do near its borders."""
    def forward(crops):
        return jnp.einsum("bhwc,ck->bhwk", crops, proj) + field[None]
    return forward


def _windows(h, w, ch, cw, sh, sw):
    """mmseg's slide boxes by the grid's definition (not the code's grid-count formula): along each axis one
    window every stride until one reaches the border, that last one moved back to end at the border."""
    def spans(n, c, s):
        starts = range(0, n - c, s)                              # the windows that stop short of the border
        return [(a, a + c) for a in starts] + [(max(n - c, 0), n)]
    return [(y1, y2, x1, x2) for y1, y2 in spans(h, ch, sh) for x1, x2 in spans(w, cw, sw)]


def _monai_importance_map(patch_size, sigma_scale):
    """``monai.data.utils.compute_importance_map(mode='gaussian')``, transcribed to NumPy line by line."""
    sigmas = [i * sigma_scale for i in patch_size]
    importance_map = None
    for i in range(len(patch_size)):
        x = np.arange(-(patch_size[i] - 1) / 2.0, (patch_size[i] - 1) / 2.0 + 1, dtype=np.float64)
        x = np.exp(x ** 2 / (-2 * sigmas[i] ** 2))
        importance_map = importance_map[..., None] * x[(None,) * i] if i > 0 else x
    min_non_zero = max(importance_map.min(), 1e-3)
    return np.maximum(importance_map, min_non_zero)


def _monai_blend(images, window_logits_fn, crop, stride, sigma_scale):
    """MONAI's aggregation: ``output += w * window_logits``, ``count += w``, ``output / count``."""
    b, h, w, _ = images.shape
    importance = _monai_importance_map(crop, sigma_scale)
    out, count = None, np.zeros((h, w))
    for y1, y2, x1, x2 in _windows(h, w, *crop, *stride):
        logits = window_logits_fn(images[:, y1:y2, x1:x2])
        if out is None:
            out = np.zeros((b, h, w, logits.shape[-1]))
        out[:, y1:y2, x1:x2] += importance[None, :, :, None] * logits
        count[y1:y2, x1:x2] += importance
    return out / count[None, :, :, None]


def test_importance_map_by_hand():
    # 3 x 3 window, sigma_scale 0.5: sigma = 1.5 on each axis, x = -1, 0, 1 -> e = exp(-1 / 4.5) off-centre.
    e = math.exp(-1 / 4.5)
    np.testing.assert_allclose(gaussian_importance_map((3, 3), 0.5),
                               [[e * e, e, e * e], [e, 1, e], [e * e, e, e * e]], rtol=1e-15)
    # sigma_scale 0.125: sigma = 0.375, off-centre 1-D weight exp(-1 / 0.28125) = 0.0286; the corners' product
    # (8.2e-4) is below 1e-3 and is raised to it.
    f = math.exp(-1 / (2 * 0.375 ** 2))
    assert f * f < 1e-3 < f
    np.testing.assert_allclose(gaussian_importance_map((3, 3), 0.125),
                               [[1e-3, f, 1e-3], [f, 1, f], [1e-3, f, 1e-3]], rtol=1e-15)
    # Even sizes: the centre lies between two pixels; non-square windows take one sigma per axis.
    m = gaussian_importance_map((4, 6), 0.25)
    np.testing.assert_allclose(m[1, 2], math.exp(-0.25 / (2 * 1.0)) * math.exp(-0.25 / (2 * 1.5 ** 2)), rtol=1e-15)
    assert m.shape == (4, 6) and np.array_equal(m, m[::-1, ::-1])


def test_gaussian_blending_by_hand():
    """Two 3 x 3 windows on a 3 x 4 image (x = 0 and x = 1); the fake model answers 0 in the first window and
    1 in the second. Where both cover a pixel the row weights cancel and the column weights are 1 (centre)
    and e = exp(-1 / 4.5) (border): column 1 gets e / (1 + e), column 2 gets 1 / (1 + e)."""
    images = jnp.asarray(np.broadcast_to(np.arange(4, dtype=np.float32)[None, None, :, None], (1, 3, 4, 3)))

    def window_id(crops):                     # the window's left column: 0 or 1
        return jnp.broadcast_to(crops[:, :1, :1, :1], crops.shape[:3] + (1,))

    got = np.asarray(inference(window_id, images, {"mode": "slide", "crop_size": (3, 3), "stride": (1, 1),
                                                   "weighting": "gaussian", "sigma_scale": 0.5}))[0, :, :, 0]
    e = math.exp(-1 / 4.5)
    expected = np.array([0.0, e / (1 + e), 1 / (1 + e), 1.0], np.float32)
    np.testing.assert_allclose(got, np.broadcast_to(expected, (3, 4)), rtol=1e-6, atol=0)
    uniform = np.asarray(inference(window_id, images, {"mode": "slide", "crop_size": (3, 3), "stride": (1, 1)}))
    np.testing.assert_array_equal(uniform[0, :, :, 0], np.broadcast_to([0, 0.5, 0.5, 1], (3, 4)))


@pytest.mark.parametrize("crop,stride,sigma_scale", [((8, 12), (5, 7), 0.125), ((9, 9), (4, 4), 0.3)])
def test_gaussian_blending_equals_monai_float64(crop, stride, sigma_scale):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 23, 30, 3))
    field, proj = rng.normal(size=(*crop, 4)), rng.normal(size=(3, 4))
    expected = _monai_blend(images, lambda c: c @ proj + field[None], crop, stride, sigma_scale)
    with jax.enable_x64(True):
        got = np.asarray(inference(_window_field_forward(jnp.asarray(field), jnp.asarray(proj)), jnp.asarray(images),
                                   {"mode": "slide", "crop_size": crop, "stride": stride, "weighting": "gaussian",
                                    "sigma_scale": sigma_scale}))
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


def test_gaussian_blending_equals_monai_float32():
    rng = np.random.default_rng(1)
    crop, stride = (8, 12), (5, 7)
    images = rng.normal(size=(1, 23, 30, 3)).astype(np.float32)
    field, proj = rng.normal(size=(*crop, 4)).astype(np.float32), rng.normal(size=(3, 4)).astype(np.float32)
    expected = _monai_blend(images.astype(np.float64), lambda c: c @ proj.astype(np.float64) + field[None],
                            crop, stride, 0.125)
    got = np.asarray(inference(_window_field_forward(jnp.asarray(field), jnp.asarray(proj)), jnp.asarray(images),
                               {"mode": "slide", "crop_size": crop, "stride": stride, "weighting": "gaussian",
                                "sigma_scale": 0.125}))
    assert got.dtype == np.float32
    # float32 logits of magnitude ~5: a few units in the last place.
    np.testing.assert_allclose(got, expected, rtol=0, atol=4e-6 * np.abs(expected).max())


def test_uniform_weighting_is_the_reference_average_in_float64():
    """The default config's slide path is mmseg's ``slide_inference``: window logits summed, divided by the
    window count, in the reference's order (float64: nothing but the same additions)."""
    test_cfg = config_utils.model_config(test_crop_size=(8, 12), test_stride=(5, 7)).test_cfg
    assert test_cfg.weighting == "uniform" and test_cfg.sigma_scale == 0.125
    rng = np.random.default_rng(2)
    images = rng.normal(size=(2, 23, 30, 3))
    field, proj = rng.normal(size=(8, 12, 4)), rng.normal(size=(3, 4))
    total, count = np.zeros((2, 23, 30, 4)), np.zeros((23, 30))
    for y1, y2, x1, x2 in _windows(23, 30, 8, 12, 5, 7):
        total[:, y1:y2, x1:x2] += images[:, y1:y2, x1:x2] @ proj + field[None]
        count[y1:y2, x1:x2] += 1
    expected = total / count[None, :, :, None]
    with jax.enable_x64(True):
        got = np.asarray(inference(_window_field_forward(jnp.asarray(field), jnp.asarray(proj)), jnp.asarray(images),
                                   test_cfg))
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, expected, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("update,expect", [
    ({"weighting": "gauss"}, "model.test_cfg.weighting"),
    ({"weighting": "gaussian", "sigma_scale": 0.0}, "model.test_cfg.sigma_scale"),
    ({"weighting": "gaussian", "sigma_scale": -1.0}, "model.test_cfg.sigma_scale"),
])
def test_bad_weighting_is_a_config_error(update, expect):
    model = config_utils.model_config(width=18, hr_scale=(128, 128), test_crop_size=(256, 256),
                                      test_stride=(128, 128))
    model.test_cfg.update(update)
    with pytest.raises(ConfigError, match=expect.replace(".", r"\.")):
        config_utils.validate_model_config(model)
    with pytest.raises(ConfigError, match=expect.replace(".", r"\.")):
        inference(lambda x: x, jnp.zeros((1, 256, 256, 3)), model.test_cfg)
    with pytest.raises(ConfigError, match="sigma_scale"):
        config_utils.window_weighting({"weighting": "gaussian", "sigma_scale": "wide"})


def test_seam_figure_pieces_by_hand():
    from hrdecoder_jax.tools.window_seams import border_masks, seam_sums

    # Windows of 4 with stride 2 on a 6 x 8 image: rows 0-4, 2-6; columns 0-4, 2-6, 4-8. Borders inside the
    # image: rows 2 and 4 (pairs 1|2 and 3|4), columns 2, 4 and 6 (pairs 1|2, 3|4, 5|6).
    boxes = [(0, 4, 0, 4), (0, 4, 2, 6), (0, 4, 4, 8), (2, 6, 0, 4), (2, 6, 2, 6), (2, 6, 4, 8)]
    rows, cols = border_masks((6, 8), boxes)
    assert rows.tolist() == [False, True, False, True, False]
    assert cols.tolist() == [False, True, False, True, False, True, False]
    # Logits that step by 1 at column 4 only (one channel): the jump is at a border pair.
    logits = np.zeros((1, 6, 8, 1))
    logits[..., 4:, 0] = 1.0
    s = seam_sums(logits, rows, cols)
    assert s["border_n"] == 2 * 8 + 3 * 6 and s["other_n"] == 3 * 8 + 4 * 6
    assert s["border_sum"] == 6.0 and s["other_sum"] == 0.0
