"""Lesion metrics: parity with the reference fixture, the float32/float64 threshold rule, hand-computed cases."""
from __future__ import annotations

import chex
import jax.numpy as jnp
import numpy as np
import pytest

from hrdecoder_jax import LESIONS
from hrdecoder_jax.metrics import (
    REFERENCE_THRESHOLDS,
    LesionMetricAccumulator,
    class_mean,
    device_image_statistics,
    float32_thresholds,
    format_table,
    lesion_metrics,
    trapezoid_auc,
)

NAMES = ("IoU", "F1", "PPV", "S", "AUPR", "MAE")
NAN = np.nan


def reference_numpy(probs, labels, thresholds=np.linspace(0, 1, 11)):
    """Line-by-line transcription of the reference ``sigmoid_metrics`` (5 classes, background row 0), with
    sklearn's ``auc`` and ``mean_absolute_error`` spelled out in numpy exactly as sklearn computes them."""
    num_classes = 5
    rows = {"tp": [], "p": [], "fn": []}
    for thresh in thresholds:
        tp, p, fn = (np.zeros(num_classes) for _ in range(3))
        for prob, label in zip(probs, labels):
            for i in range(1, num_classes):
                pred = prob[i - 1] > thresh
                lab = label == i
                tp[i] += np.sum(lab & pred)
                p[i] += np.sum(pred)
                fn[i] += np.sum(lab) - np.sum(lab & pred)
        rows["tp"].append(tp), rows["p"].append(p), rows["fn"].append(fn)
    tp, p, fn = (np.stack(rows[k]) for k in ("tp", "p", "fn"))
    with np.errstate(divide="ignore", invalid="ignore"):
        ppv_list = np.nan_to_num(tp / p, nan=1)
        s_list = np.nan_to_num(tp / (tp + fn), nan=0)
        half = int(np.argmax(thresholds == 0.5))
        t, q, f = tp[half], p[half], fn[half]
        out = {"IoU": t / (q + f), "F1": 2 * t / (q + t + f), "PPV": t / q, "S": t / (t + f)}
    aupr = np.zeros(num_classes)
    for i in range(1, num_classes):
        x, y = s_list[:, i], ppv_list[:, i]
        direction = -1 if np.any(np.diff(x) < 0) else 1
        aupr[i] = direction * np.trapezoid(y, x)
    mae = np.zeros(num_classes)
    for prob, label in zip(probs, labels):
        for j in range(1, num_classes):
            mae[j] += float(np.average(np.average(np.abs(prob[j - 1] - (label == j)), axis=0)))
    out["AUPR"], out["MAE"] = aupr, mae / len(probs)
    return {k: v[1:] for k, v in out.items()}


def assert_metrics_match(results, expected, rtol=1e-9):
    for name in NAMES:
        got, want = np.asarray(results[name]), np.asarray(expected[name], dtype=np.float64)
        chex.assert_shape(got, (len(LESIONS),))
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=name)
        np.testing.assert_allclose(got, want, rtol=rtol, atol=0, err_msg=name)
        assert results["m" + name] == pytest.approx(np.mean(np.nan_to_num(want, nan=0.0)), rel=rtol, abs=1e-15)


@pytest.fixture(scope="module")
def reference(fixtures_dir):
    data = np.load(fixtures_dir / "metrics_seed0.npz")
    count = len([k for k in data.files if k.startswith("probs_")])
    probs = [data[f"probs_{i}"] for i in range(count)]
    labels = [data[f"label_{i}"] for i in range(count)]
    expected = {name: data[f"ref_{name}"][1:] for name in NAMES}
    return probs, labels, expected


# ------------------------------------------------------------------ the fixture


def test_fixture_list_function(reference):
    probs, labels, expected = reference
    results = lesion_metrics(probs, labels)
    assert_metrics_match(results, expected)
    # MAE is bit-exact (float32 arithmetic replayed), and it is stored as a fraction, not x100.
    np.testing.assert_array_equal(results["MAE"], expected["MAE"])
    assert np.all(expected["MAE"] < 1)
    assert results["num_images"] == 3


@pytest.mark.parametrize("batches", [(1, 2), (3,), (2, 1), (1, 1, 1)])
@pytest.mark.parametrize("as_jax", [False, True])
def test_fixture_streaming_batches(reference, batches, as_jax):
    probs, labels, expected = reference
    convert = jnp.asarray if as_jax else np.asarray
    accumulator = LesionMetricAccumulator()
    start = 0
    for size in batches:
        batch_probs = np.stack(probs[start:start + size])
        batch_labels = np.stack(labels[start:start + size])
        if size == 1 and start == 0:  # unbatched [4, H, W] / [H, W] input
            batch_probs, batch_labels = batch_probs[0], batch_labels[0]
        accumulator.update(convert(batch_probs), convert(batch_labels))
        start += size
    results = accumulator.compute()
    assert_metrics_match(results, expected)
    np.testing.assert_array_equal(results["MAE"], expected["MAE"])
    np.testing.assert_array_equal(results["per_image"]["MAE"], lesion_metrics(probs, labels)["per_image"]["MAE"])


def test_fixture_exact_float64_mae_would_not_match(reference):
    """Documents why MAE replays float32: the exact float64 mean is off the reference by > 1e-9 relative."""
    probs, labels, expected = reference
    exact = np.mean([[np.mean(np.abs(p[c].astype(np.float64) - (l == c + 1))) for c in range(4)]
                     for p, l in zip(probs, labels)], axis=0)
    assert np.max(np.abs(exact - expected["MAE"]) / expected["MAE"]) > 1e-8


# ------------------------------------------------------------------ thresholds


def test_float32_thresholds_equal_float64_comparison():
    specials = np.float32([0.0, 0.5, 1.0, 0.1, 0.3, 0.7, 0.6, 0.9, 0.2])
    for grid in (REFERENCE_THRESHOLDS, np.linspace(0, 1, 101), np.linspace(0, 1, 1001)):
        t32 = float32_thresholds(grid)
        assert t32.dtype == np.float32
        assert np.all(t32.astype(np.float64) <= grid)
        assert np.all(np.nextafter(t32, np.float32(np.inf)).astype(np.float64) > grid)
        for t64, t in zip(grid, t32):
            near = np.float32(t64)  # round-to-nearest, then a few ulps either side
            candidates = [near]
            up, down = near, near
            for _ in range(3):
                up, down = np.nextafter(up, np.float32(2)), np.nextafter(down, np.float32(-1))
                candidates += [up, down]
            p = np.concatenate([np.float32(candidates), specials])
            np.testing.assert_array_equal(p > t, p.astype(np.float64) > t64)
    # The values that break a round-to-nearest threshold, by hand
    # (linspace gives 0.30000000000000004 and 0.7000000000000001):
    t32 = float32_thresholds(REFERENCE_THRESHOLDS)
    assert np.float32(0.1) > REFERENCE_THRESHOLDS[1] and np.float32(0.1) > t32[1]
    assert np.float32(0.3) > REFERENCE_THRESHOLDS[3] and np.float32(0.3) > t32[3]
    assert not np.float32(0.7) > REFERENCE_THRESHOLDS[7] and not np.float32(0.7) > t32[7]
    assert t32[0] == 0.0 and t32[5] == 0.5 and t32[10] == 1.0


def test_device_counts_match_float64_comparison():
    values = np.float32([0.0, 0.5, 1.0, 0.1, 0.3, 0.7, 0.6, 0.9, np.nextafter(np.float32(0.5), 1),
                         np.nextafter(np.float32(0.5), 0), np.nan, 0.4])
    probs = np.stack([np.roll(values, c) for c in range(4)]).reshape(4, 3, 4)
    labels = np.array([[1, 2, 3, 4], [0, 1, 1, 2], [3, 4, 255, 0]], np.uint8)
    stats = device_image_statistics(jnp.asarray(probs[None]), jnp.asarray(labels[None]),
                                    jnp.asarray(float32_thresholds(REFERENCE_THRESHOLDS)))
    for k, t in enumerate(REFERENCE_THRESHOLDS):
        pred = probs.astype(np.float64) > t
        lesion = labels[None] == np.arange(1, 5)[:, None, None]
        np.testing.assert_array_equal(stats["predicted"][0, k], pred.sum(axis=(1, 2)))
        np.testing.assert_array_equal(stats["true_positives"][0, k], (pred & lesion).sum(axis=(1, 2)))
    np.testing.assert_array_equal(stats["positives"][0], [3, 2, 2, 2])
    chex.assert_type([stats["predicted"], stats["true_positives"], stats["positives"]], jnp.int32)


# ------------------------------------------------------------------ hand-computed cases


def image_a():
    """2x2, EX only: p = [[.95, .65], [.35, .05]], EX at the left column; other channels 0."""
    probs = np.zeros((4, 2, 2), np.float32)
    probs[0] = [[0.95, 0.65], [0.35, 0.05]]
    return probs, np.array([[1, 0], [1, 0]], np.uint8)


def image_b():
    """1x4, HE only: p = [.5, 1, 0, .5], HE at the first two pixels; strict > drops 0.5 at t=.5 and 1 at t=1."""
    probs = np.zeros((4, 1, 4), np.float32)
    probs[1] = [[0.5, 1.0, 0.0, 0.5]]
    return probs, np.array([[2, 2, 0, 0]], np.uint8)


def image_c():
    """2x2 with no lesion at all; one EX false positive of 0.55."""
    probs = np.zeros((4, 2, 2), np.float32)
    probs[0, 0, 0] = 0.55
    return probs, np.zeros((2, 2), np.uint8)


def test_hand_aupr_and_counts_single_image():
    # Thresholds 0 | .1-.3 | .4-.6 | .7-.9 | 1 give (recall, precision)
    # (1, 1/2) | (1, 2/3) | (1/2, 1/2) | (1/2, 1) | (0, 1):
    # area = 1/2 * (2/3 + 1/2) / 2 + 1/2 * (1 + 1) / 2 = 7/24 + 12/24.
    results = lesion_metrics(*zip(image_a()))
    expected = {"IoU": [1 / 3, NAN, NAN, NAN], "F1": [1 / 2, NAN, NAN, NAN], "PPV": [1 / 2, NAN, NAN, NAN],
                "S": [1 / 2, NAN, NAN, NAN], "AUPR": [19 / 24, 0, 0, 0], "MAE": [0.35, 0, 0, 0]}
    assert_metrics_match(results, expected, rtol=1e-7)  # MAE is float32 arithmetic
    assert results["mIoU"] == pytest.approx(1 / 12)
    assert results["mAUPR"] == pytest.approx(19 / 96)


def test_strict_threshold_at_half_and_one():
    # t=0..0.4: pixels .5, 1, .5 predicted (TP 2, P 3); t=.5..0.9: only p=1 (TP 1, P 1); t=1: nothing.
    probs, labels = image_b()
    stats = device_image_statistics(jnp.asarray(probs[None]), jnp.asarray(labels[None]),
                                    jnp.asarray(float32_thresholds(REFERENCE_THRESHOLDS)))
    np.testing.assert_array_equal(stats["predicted"][0, :, 1], [3] * 5 + [1] * 5 + [0])
    np.testing.assert_array_equal(stats["true_positives"][0, :, 1], [2] * 5 + [1] * 5 + [0])
    results = lesion_metrics([probs], [labels])
    # AUPR: (1, 2/3) x5, (1/2, 1) x5, (0, 1): 1/2 * (2/3 + 1) / 2 + 1/2 = 11/12.
    expected = {"IoU": [NAN, 1 / 2, NAN, NAN], "F1": [NAN, 2 / 3, NAN, NAN], "PPV": [NAN, 1, NAN, NAN],
                "S": [NAN, 1 / 2, NAN, NAN], "AUPR": [0, 11 / 12, 0, 0], "MAE": [0, 0.25, 0, 0]}
    assert_metrics_match(results, expected, rtol=1e-12)


def test_dataset_level_counts_absent_lesions_and_lesion_free_image():
    images = [image_a(), image_b(), image_c()]
    results = lesion_metrics([p for p, _ in images], [l for _, l in images])
    # EX over the set: image c adds one false positive for t <= .5, so at .5 TP 1, P 3, FN 1.
    # Points: (1, 2/5), (1, 1/2) x3, (1/2, 1/3) x2, (1/2, 1/2), (1/2, 1) x3, (0, 1) -> 1/2 * (1/2 + 1/3) / 2 + 1/2.
    # SE and MA: never labelled, never predicted -> NaN, AUPR 0, MAE 0, and 0 in the class means.
    expected = {"IoU": [1 / 4, 1 / 2, NAN, NAN], "F1": [2 / 5, 2 / 3, NAN, NAN], "PPV": [1 / 3, 1, NAN, NAN],
                "S": [1 / 2, 1 / 2, NAN, NAN], "AUPR": [17 / 24, 11 / 12, 0, 0],
                "MAE": [(0.35 + 0 + 0.55 / 4) / 3, 0.25 / 3, 0, 0]}
    assert_metrics_match(results, expected, rtol=1e-7)
    assert results["mIoU"] == pytest.approx(3 / 16, rel=1e-12)
    assert results["mAUPR"] == pytest.approx(39 / 96, rel=1e-12)
    assert results["mS"] == pytest.approx(1 / 4, rel=1e-12)

    per_image = results["per_image"]
    for name in ("IoU", "F1", "PPV", "S", "MAE"):
        chex.assert_shape(per_image[name], (3, 4))
    np.testing.assert_allclose(per_image["IoU"], [[1 / 3, NAN, NAN, NAN], [NAN, 1 / 2, NAN, NAN],
                                                  [0, NAN, NAN, NAN]], rtol=1e-12)
    np.testing.assert_allclose(per_image["S"][2], [NAN] * 4)  # no lesion in image c: recall undefined
    np.testing.assert_allclose(per_image["PPV"][2], [0, NAN, NAN, NAN])
    np.testing.assert_allclose(per_image["F1"][:, 0], [1 / 2, NAN, 0], rtol=1e-12)
    np.testing.assert_allclose(per_image["MAE"], [[0.35, 0, 0, 0], [0, 0.25, 0, 0], [0.1375, 0, 0, 0]], rtol=1e-7)
    assert class_mean(np.array([1.0, NAN, 0.5, NAN])) == 0.375


def test_trapezoid_auc_like_sklearn():
    assert trapezoid_auc([0, 0.5, 1], [1, 1, 0]) == pytest.approx(0.75)
    assert trapezoid_auc([1, 0.5, 0], [0, 1, 1]) == pytest.approx(0.75)  # decreasing x: positive area
    assert trapezoid_auc([0, 0, 0], [1, 1, 1]) == 0.0
    with pytest.raises(ValueError, match="neither increasing nor decreasing"):
        trapezoid_auc([0, 1, 0.5], [1, 1, 1])


# ------------------------------------------------------------------ random data against the transcription


def random_images(seed, shapes):
    rng = np.random.default_rng(seed)
    probs, labels = [], []
    for height, width in shapes:
        label = rng.choice(5, size=(height, width), p=[0.6, 0.15, 0.1, 0.1, 0.05]).astype(np.uint8)
        logits = rng.normal(0, 2, (4, height, width)) + 3 * (label[None] == np.arange(1, 5)[:, None, None]) - 1.5
        prob = (1 / (1 + np.exp(-logits))).astype(np.float32)
        # Sprinkle values that sit on thresholds or on their float32 neighbours.
        specials = np.float32([0.0, 0.1, 0.3, 0.5, 0.7, 1.0])
        mask = rng.random(prob.shape) < 0.05
        prob[mask] = rng.choice(specials, size=mask.sum())
        probs.append(prob)
        labels.append(label)
    return probs, labels


def test_random_images_of_mixed_sizes_match_transcription():
    probs, labels = random_images(3, [(131, 67), (131, 67), (40, 203)])
    results = lesion_metrics(probs, labels)
    expected = reference_numpy(probs, labels)
    assert_metrics_match(results, expected, rtol=1e-12)
    np.testing.assert_array_equal(results["MAE"], expected["MAE"])
    fine = reference_numpy(probs, labels, np.linspace(0, 1, 101))
    np.testing.assert_allclose(results["AUPR_fine"], fine["AUPR"], rtol=1e-12)


# ------------------------------------------------------------------ extras


def test_fine_aupr_close_to_reference_grid_on_smooth_case():
    rng = np.random.default_rng(0)
    label = (rng.random((128, 128)) < 0.3).astype(np.uint8) * 2  # HE
    logits = 1.5 * (2.0 * (label == 2) - 1) + rng.normal(0, 1.5, label.shape)
    probs = np.zeros((4, 128, 128), np.float32)
    probs[1] = 1 / (1 + np.exp(-logits))
    results = lesion_metrics([probs], [label])
    finer = lesion_metrics([probs], [label], num_fine_thresholds=1001)
    assert 0.8 < results["AUPR"][1] < 0.95
    assert abs(results["AUPR_fine"][1] - results["AUPR"][1]) < 0.01
    assert abs(finer["AUPR_fine"][1] - results["AUPR_fine"][1]) < 1e-3
    assert np.all(results["AUPR_fine"] >= 0) and np.all(finer["AUPR_fine"] >= 0)
    np.testing.assert_array_equal(results["AUPR_fine"][[0, 2, 3]], 0.0)
    # With 11 fine thresholds the fine grid is the reference grid.
    same = lesion_metrics([probs], [label], num_fine_thresholds=11)
    np.testing.assert_array_equal(same["AUPR_fine"], same["AUPR"])
    assert same["mAUPR_fine"] == same["mAUPR"]


def test_accumulator_state_has_no_pixel_arrays_and_resets(reference):
    probs, labels, expected = reference
    accumulator = LesionMetricAccumulator()
    accumulator.update(np.stack(probs), np.stack(labels))
    assert accumulator.num_images == 3
    pixel_count = probs[0][0].size  # H * W
    held = [v for v in vars(accumulator).values() if isinstance(v, np.ndarray)]
    held += [a for v in vars(accumulator).values() if isinstance(v, list) for a in v]
    assert all(a.size < pixel_count / 10 for a in held)
    assert accumulator._pending is None
    accumulator.reset()
    with pytest.raises(ValueError, match="no images"):
        accumulator.compute()
    accumulator.update(probs[0], labels[0])
    with pytest.raises(ValueError, match="expected probs"):
        accumulator.update(probs[0][:3], labels[0])


def test_format_table(reference):
    probs, labels, _ = reference
    table = format_table(lesion_metrics(probs, labels))
    lines = table.splitlines()
    assert lines[0].split() == ["Class", "IoU", "F1", "PPV", "S", "AUPR", "MAE(e-2)"]
    assert [line.split()[0] for line in lines[1:]] == [*LESIONS, "mean"]
    assert lines[1].split()[1:] == ["51.34", "67.84", "63.10", "73.37", "68.60", "15.77"]
    assert lines[5].split()[1] == "52.89"  # mIoU x100
