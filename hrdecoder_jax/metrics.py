"""Lesion metrics: the reference protocol (mmseg ``lesion_metric.py`` + ``LesionDataset.evaluate``), streamed.

Protocol, per lesion class c in (EX, HE, SE, MA) (label value c + 1; 0 background and 255 are negatives):

* Thresholds ``np.linspace(0, 1, 11)``; a pixel is predicted when ``prob > t`` (**strict**, compared as the
  reference does: float32 probability against a float64 threshold).
* Pixel counts are summed over the whole test set (dataset level, not per image): TP, P (predicted positives)
  and FN = (label positives) - TP, per threshold.
* IoU = TP / (P + FN), F1 = 2TP / (P + TP + FN), PPV = TP / P, S (sensitivity) = TP / (TP + FN), all at t = 0.5.
  A class with no label and no prediction anywhere gives NaN, as in the reference.
* AUPR = ``sklearn.metrics.auc(recall, precision)`` over the 11 thresholds, precision NaN -> 1 and recall
  NaN -> 0: a trapezoid over (recall, precision) points whose recall decreases with t.
* MAE = per image ``sklearn.metrics.mean_absolute_error(gt == c, prob)`` on the ``[H, W]`` maps, averaged over
  images. sklearn keeps float32: it takes float32 column means over the H rows (a sequential float32 sum), then
  the float32 mean of those W column means. This module reproduces that arithmetic bit for bit (see
  :func:`device_image_statistics`), because the exact float64 value differs from the reference by up to
  ~5e-8 relative on the reference fixture.
* Class means ``mX = nanmean(nan_to_num(X, nan=0))``: a NaN class counts as 0.

Units: every value is a **fraction** (IoU 0.51, MAE 0.158), exactly as the reference returns them (the
``metrics_seed0.npz`` fixture stores MAE as a fraction too). The reference *prints* everything x100 with two
decimals, MAE as "MAE(e-2)"; :func:`format_table` does the same.

Extras beyond the reference: ``AUPR_fine`` (same rule over ``num_fine_thresholds`` thresholds, default 101)
and per-image IoU/F1/PPV/S/MAE.

Memory: the per-threshold counting and the MAE column sums run on device in one jitted function
(:func:`device_image_statistics`); only ``[num_thresholds, 4]`` integer counts and ``[4, W]`` float32 column
sums per image reach the host, which keeps int64 totals and per-image scalars. Full-resolution maps are never
stored, so memory does not grow with the number of images beyond a few scalars per image.
"""
from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from hrdecoder_jax import LESIONS

Array = jax.Array

REFERENCE_THRESHOLDS = np.linspace(0.0, 1.0, 11)
"""The reference's AUPR thresholds (float64); IoU/F1/PPV/S use the row where t == 0.5 (index 5, exact)."""
REFERENCE_THRESHOLD = 0.5
DEFAULT_NUM_FINE_THRESHOLDS = 101
METRIC_NAMES = ("IoU", "F1", "PPV", "S", "AUPR", "MAE")


# ----------------------------------------------------------------------------------------------------------
# Exact thresholds and the trapezoid
# ----------------------------------------------------------------------------------------------------------


def float32_thresholds(thresholds: Any) -> np.ndarray:
    """float64 thresholds ``[K]`` -> float32 thresholds ``[K]`` with ``p > t32  <=>  p > t64`` for float32 p.

    The reference compares float32 probabilities with float64 thresholds, so ``float32(0.1) > 0.1`` is True
    (float32(0.1) = 0.100000001490116...). Rounding t to the *nearest* float32 would get that pixel wrong.
    Take ``t32`` = the largest float32 <= t64 instead:
    * p > t64 >= t32 gives p > t32;
    * p > t32 with p a float32 means p >= the next float32 above t32, which is > t64 (t32 is the largest
      float32 not above t64), so p > t64.
    NaN probabilities are False under both. Thresholds that are float32 already (0, 0.5, 1) are unchanged.
    """
    t64 = np.asarray(thresholds, dtype=np.float64)
    t32 = t64.astype(np.float32)
    too_high = t32.astype(np.float64) > t64
    t32[too_high] = np.nextafter(t32[too_high], np.float32(-np.inf))
    return t32


def trapezoid_auc(x: Any, y: Any) -> float:
    """Area under the curve ``y(x)`` for points ``x, y [K]`` with ``sklearn.metrics.auc`` semantics.

    x must be monotone (non-decreasing or non-increasing); a decreasing x (recall against an increasing
    threshold) gives a positive area. Raises ``ValueError`` for non-monotone x, as sklearn does.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.shape[0] < 2:
        raise ValueError(f"need two 1-D arrays of at least 2 points, got {x.shape} and {y.shape}")
    direction = 1.0
    dx = np.diff(x)
    if np.any(dx < 0):
        if np.all(dx <= 0):
            direction = -1.0
        else:
            raise ValueError(f"x is neither increasing nor decreasing: {x}")
    # The same expression as np.trapezoid, which sklearn.metrics.auc calls.
    return float(direction * np.sum(dx * (y[1:] + y[:-1]) / 2.0))


def _precision_recall(true_positives: np.ndarray, predicted: np.ndarray,
                      positives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-threshold precision and recall ``[K, 4]`` with the AUPR rule's conventions (0/0 precision -> 1,
    0/0 recall -> 0)."""
    true_positives = true_positives.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.nan_to_num(true_positives / predicted, nan=1.0)
        recall = np.nan_to_num(true_positives / positives.astype(np.float64), nan=0.0)
    return precision, recall


def _aupr(true_positives: np.ndarray, predicted: np.ndarray, positives: np.ndarray) -> np.ndarray:
    """AUPR ``[4]`` from counts ``true_positives, predicted [K, 4]`` (ascending thresholds), ``positives [4]``."""
    precision, recall = _precision_recall(true_positives, predicted, positives)
    return np.array([trapezoid_auc(recall[:, c], precision[:, c]) for c in range(precision.shape[1])])


def _ratios(true_positives: np.ndarray, predicted: np.ndarray, positives: np.ndarray) -> dict[str, np.ndarray]:
    """IoU/F1/PPV/S from counts of matching shapes, in float64 with the reference's formulas (NaN for 0/0)."""
    tp = true_positives.astype(np.float64)
    p = predicted.astype(np.float64)
    fn = positives.astype(np.float64) - tp
    with np.errstate(divide="ignore", invalid="ignore"):
        return {"IoU": tp / (p + fn), "F1": 2 * tp / (p + tp + fn), "PPV": tp / p, "S": tp / (tp + fn)}


def class_mean(values: np.ndarray) -> float:
    """The reference's class mean: ``nanmean(nan_to_num(v, nan=0))``, so a NaN class counts as 0."""
    return float(np.nanmean(np.nan_to_num(np.asarray(values, dtype=np.float64), nan=0.0)))


# ----------------------------------------------------------------------------------------------------------
# Device side
# ----------------------------------------------------------------------------------------------------------


@jax.jit
def device_image_statistics(probs: Array, labels: Array, thresholds: Array) -> dict[str, Array]:
    """Per-image sufficient statistics of the protocol, computed on device.

    Args:
      probs: ``[B, 4, H, W]`` float32 sigmoid probabilities (EX, HE, SE, MA).
      labels: ``[B, H, W]`` integer labels (0 background, 1..4 lesions, anything else negative).
      thresholds: ``[K]`` float32 thresholds from :func:`float32_thresholds` (so ``p > t`` is exact), strictly
        ascending.

    Returns a dict of
      ``true_positives [B, K, 4]`` int32: pixels with ``p > t`` and label c,
      ``predicted [B, K, 4]`` int32: pixels with ``p > t``,
      ``positives [B, 4]`` int32: pixels with label c (one image has < 2^31 pixels),
      ``abs_error_column_sums [B, 4, W]`` float32: ``sum_h |p[h, w] - (label[h, w] == c)|`` added row by row.

    Why the MAE is a sequential float32 row sum: the reference's MAE is sklearn on float32 maps, i.e. numpy's
    ``mean(axis=0)`` of an ``[H, W]`` float32 array, which adds the rows one after another in float32, then a
    float32 mean over columns. Any other order (XLA's tree reduction, float64, Kahan) gives a *different*
    number (exact float64 is off by up to 5e-8 relative on the 96 x 144 fixture, more at 2848 x 4288).
    A ``fori_loop`` over rows fixes the order, and IEEE float32 adds are the same on every backend, so the
    column sums equal numpy's bit for bit (checked on CPU; no GPU was available to check there).
    The host finishes with numpy (:func:`_mean_absolute_error`), using the very operations sklearn uses.
    """
    probs = probs.astype(jnp.float32)
    batch, num_classes = probs.shape[:2]
    num_thresholds = thresholds.shape[0]
    classes = jnp.arange(1, num_classes + 1, dtype=jnp.int32)
    lesion = labels.astype(jnp.int32)[:, None] == classes[None, :, None, None]  # [B, 4, H, W]

    # Bucket each pixel once: level = #(thresholds < p), so the pixel is predicted at threshold k iff
    # level > k. One binary search plus one histogram beats K compare-and-reduce passes (on a 2-core CPU,
    # 1.4 s instead of 18 s for 112 thresholds on a 4 x 2848 x 4288 map) and gives the same integers.
    level = jnp.searchsorted(thresholds, probs, side="left", method="scan").astype(jnp.int32)
    level = jnp.where(jnp.isnan(probs), 0, level)  # NaN > t is False for every t, as in numpy
    offsets = (jnp.arange(batch, dtype=jnp.int32)[:, None] * num_classes + jnp.arange(num_classes)) * (
        num_thresholds + 1
    )
    bins = (level + offsets[:, :, None, None]).reshape(-1)
    size = batch * num_classes * (num_thresholds + 1)
    level_counts = jnp.zeros(size, jnp.int32).at[bins].add(1).reshape(batch, num_classes, -1)
    lesion_level_counts = (
        jnp.zeros(size, jnp.int32).at[bins].add(lesion.reshape(-1).astype(jnp.int32)).reshape(batch, num_classes, -1)
    )

    def above(counts):  # [B, 4, K + 1] histogram over levels -> [B, K, 4] pixels with level > k
        return jnp.moveaxis(jnp.cumsum(counts[..., ::-1], axis=-1)[..., ::-1][..., 1:], -1, 1)

    def add_row(row, column_sums):
        prob_row = jax.lax.dynamic_index_in_dim(probs, row, axis=2, keepdims=False)  # [B, 4, W]
        target_row = jax.lax.dynamic_index_in_dim(lesion, row, axis=2, keepdims=False).astype(jnp.float32)
        return column_sums + jnp.abs(prob_row - target_row)

    column_sums = jnp.zeros(probs.shape[:2] + probs.shape[3:], jnp.float32)
    column_sums = jax.lax.fori_loop(0, probs.shape[2], add_row, column_sums, unroll=8)
    return {
        "true_positives": above(lesion_level_counts),
        "predicted": above(level_counts),
        "positives": jnp.sum(lesion, axis=(-2, -1), dtype=jnp.int32),
        "abs_error_column_sums": column_sums,
    }


def _mean_absolute_error(column_sums: np.ndarray, height: int) -> np.ndarray:
    """Per-class MAE ``[4]`` (float32 values as float64) from one image's ``column_sums [4, W]`` float32.

    Replays the rest of sklearn's ``mean_absolute_error`` on float32 input: numpy's ``mean(axis=0)`` divides
    the float32 sums by an intp count (a float64 division, stored back into float32), then
    ``np.average`` over the W columns (numpy's pairwise float32 sum, divided the same way).
    """
    column_means = np.empty_like(column_sums, dtype=np.float32)
    np.true_divide(column_sums.astype(np.float32), np.intp(height), out=column_means, casting="unsafe")
    return np.array([float(np.average(column_means[c])) for c in range(column_means.shape[0])])


# ----------------------------------------------------------------------------------------------------------
# Streaming accumulator
# ----------------------------------------------------------------------------------------------------------


class LesionMetricAccumulator:
    """Streaming version of the reference lesion metrics; ``compute()`` returns what :func:`lesion_metrics` does.

    ``update`` takes one image (``probs [4, H, W]``, ``labels [H, W]``) or a batch (``[B, 4, H, W]``,
    ``[B, H, W]``), as numpy or (possibly sharded) jax arrays. Probabilities are compared and averaged in
    float32, the reference's dtype; float64 input is rounded to float32 first.

    Held state: int64 totals ``[K, 4]`` of TP and P over the union of the reference and fine threshold grids,
    int64 label positives ``[4]``, a float64 MAE sum ``[4]``, and per image 4 counts x 3 and 4 MAEs. The device
    results of the latest batch are fetched at the next ``update``/``compute``, so the device works on batch
    i while the host prepares batch i + 1.
    """

    def __init__(self, *, num_fine_thresholds: int | None = None):
        num_fine = DEFAULT_NUM_FINE_THRESHOLDS if num_fine_thresholds is None else int(num_fine_thresholds)
        if num_fine < 2:
            raise ValueError(f"num_fine_thresholds must be >= 2, got {num_fine}")
        coarse = float32_thresholds(REFERENCE_THRESHOLDS)
        fine = float32_thresholds(np.linspace(0.0, 1.0, num_fine))
        # Count once over the union; both grids are ascending, so their indices into it are ascending too.
        self._thresholds, inverse = np.unique(np.concatenate([coarse, fine]), return_inverse=True)
        self._coarse_index = inverse[: coarse.size]
        self._fine_index = inverse[coarse.size :]
        self._reference_row = self._coarse_index[int(np.argmax(REFERENCE_THRESHOLDS == REFERENCE_THRESHOLD))]
        self.num_fine_thresholds = num_fine
        self.reset()

    def reset(self) -> None:
        """Forget every image seen so far."""
        num_classes = len(LESIONS)
        self._true_positives = np.zeros((self._thresholds.size, num_classes), np.int64)
        self._predicted = np.zeros((self._thresholds.size, num_classes), np.int64)
        self._positives = np.zeros((num_classes,), np.int64)
        self._mae_sum = np.zeros((num_classes,), np.float64)
        self._image_counts: list[np.ndarray] = []  # [3, 4] per image: TP, P, positives at t = 0.5
        self._image_mae: list[np.ndarray] = []  # [4] per image
        self._pending: tuple[dict[str, Array], int] | None = None

    @property
    def num_images(self) -> int:
        self._flush()
        return len(self._image_mae)

    def update(self, probs: Any, labels: Any) -> None:
        """Add one image (``[4, H, W]``, ``[H, W]``) or a batch (``[B, 4, H, W]``, ``[B, H, W]``)."""
        probs = jnp.asarray(probs, dtype=jnp.float32)
        labels = jnp.asarray(labels)
        if probs.ndim == 3:
            probs, labels = probs[None], labels[None]
        if probs.ndim != 4 or probs.shape[1] != len(LESIONS) or labels.shape != probs.shape[:1] + probs.shape[2:]:
            raise ValueError(f"expected probs [B, {len(LESIONS)}, H, W] and labels [B, H, W], got "
                             f"{probs.shape} and {labels.shape}")
        if not jnp.issubdtype(labels.dtype, jnp.integer):
            raise TypeError(f"labels must be integers, got {labels.dtype}")
        self._flush()
        self._pending = (device_image_statistics(probs, labels, jnp.asarray(self._thresholds)), probs.shape[2])

    def _flush(self) -> None:
        if self._pending is None:
            return
        stats, height = self._pending
        self._pending = None
        stats = jax.device_get(stats)
        true_positives = stats["true_positives"].astype(np.int64)
        predicted = stats["predicted"].astype(np.int64)
        positives = stats["positives"].astype(np.int64)
        self._true_positives += true_positives.sum(axis=0)
        self._predicted += predicted.sum(axis=0)
        self._positives += positives.sum(axis=0)
        row = self._reference_row
        for b in range(positives.shape[0]):
            mae = _mean_absolute_error(stats["abs_error_column_sums"][b], height)
            self._mae_sum += mae  # in image order, as the reference's float64 total
            self._image_mae.append(mae)
            self._image_counts.append(np.stack([true_positives[b, row], predicted[b, row], positives[b]]))

    def pr_curve(self, grid: str = "fine") -> dict[str, np.ndarray]:
        """``thresholds [K]``, ``precision [K, 4]``, ``recall [K, 4]`` of the dataset-level counts on the
        ``fine`` (``linspace(0, 1, num_fine_thresholds)``) or ``reference`` (11 thresholds) grid: the points
        the AUPR integrates."""
        self._flush()
        index = self._fine_index if grid == "fine" else self._coarse_index
        precision, recall = _precision_recall(self._true_positives[index], self._predicted[index], self._positives)
        return {"thresholds": np.linspace(0.0, 1.0, precision.shape[0]), "precision": precision, "recall": recall}

    def compute(self) -> dict[str, Any]:
        """The metrics over every image seen so far.

        Returns a dict with ``IoU, F1, PPV, S, AUPR, MAE, AUPR_fine``: float64 ``[4]`` over (EX, HE, SE, MA),
        fractions, NaN where the reference gives NaN; ``mIoU, mF1, mPPV, mS, mAUPR, mMAE, mAUPR_fine``: floats,
        class means with NaN counted as 0; ``per_image``: dict of float64 ``[num_images, 4]`` arrays
        ``IoU, F1, PPV, S`` (from that image's counts at t = 0.5) and ``MAE``; ``num_images``; and
        ``thresholds`` (the float64 reference thresholds).
        """
        self._flush()
        num_images = len(self._image_mae)
        if num_images == 0:
            raise ValueError("no images were added")
        row = self._reference_row
        results: dict[str, Any] = _ratios(self._true_positives[row], self._predicted[row], self._positives)
        coarse, fine = self._coarse_index, self._fine_index
        results["AUPR"] = _aupr(self._true_positives[coarse], self._predicted[coarse], self._positives)
        results["MAE"] = self._mae_sum / num_images
        results["AUPR_fine"] = _aupr(self._true_positives[fine], self._predicted[fine], self._positives)
        for name in METRIC_NAMES + ("AUPR_fine",):
            results["m" + name] = class_mean(results[name])
        counts = np.stack(self._image_counts)  # [N, 3, 4]
        per_image = _ratios(counts[:, 0], counts[:, 1], counts[:, 2])
        per_image["MAE"] = np.stack(self._image_mae)
        results["per_image"] = per_image
        results["num_images"] = num_images
        results["thresholds"] = REFERENCE_THRESHOLDS.copy()
        return results


def lesion_metrics(
    probs: Iterable[Any], labels: Iterable[Any], *, num_fine_thresholds: int | None = None
) -> dict[str, Any]:
    """Reference lesion metrics over images: ``probs`` yields ``[4, H, W]`` maps, ``labels`` ``[H, W]`` maps.

    Runs :class:`LesionMetricAccumulator` one image at a time; see its ``compute`` for the returned dict.
    ``num_fine_thresholds`` (default 101) sets the grid ``linspace(0, 1, n)`` of ``AUPR_fine``.
    """
    accumulator = LesionMetricAccumulator(num_fine_thresholds=num_fine_thresholds)
    for prob, label in zip(probs, labels, strict=True):
        accumulator.update(prob, label)
    return accumulator.compute()


def format_table(results: dict[str, Any]) -> str:
    """The reference's per-lesion table: rows EX, HE, SE, MA and the class mean, values x100 with 2 decimals."""
    line = "{:<8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9}\n"
    header = ("IoU", "F1", "PPV", "S", "AUPR", "MAE(e-2)")
    table = line.format("Class", *header)
    for c, lesion in enumerate(LESIONS):
        table += line.format(lesion, *(f"{100 * results[name][c]:.2f}" for name in METRIC_NAMES))
    table += line.format("mean", *(f"{100 * results['m' + name]:.2f}" for name in METRIC_NAMES))
    return table
