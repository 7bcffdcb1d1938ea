"""The evaluation loop: the reference lesion metrics of a model on a dataset split, one image at a time.

Used by training (periodic validation, on the model in memory) and by the ``evaluate`` command::

    from hrdecoder_jax.evaluation import evaluate
    results = evaluate(model, config)                 # config.eval.split, config.eval.max_images
    results = evaluate(model, config, dataset=ds)     # any tf.data.Dataset of raw examples

Memory: each image goes through ``inference`` -> ``probabilities`` -> ``LesionMetricAccumulator.update`` and
is dropped; the accumulator keeps counts and a few scalars per image, so host memory does not grow with
the number of images (see ``docs/evaluation.md`` for a measurement at IDRiD resolution).
"""
from __future__ import annotations

import sys
import time
from typing import Any, Callable

import numpy as np


def _label_of(batch: dict) -> np.ndarray:
    """``[H, W]`` int32 fused label of a ``make_eval_dataset`` element (``label`` or multilabel ``masks``)."""
    if "label" in batch:
        return np.asarray(batch["label"][0], np.int32)
    masks = np.asarray(batch["masks"][0])
    label = np.zeros(masks.shape[:2], np.int32)
    for c in range(masks.shape[-1]):  # overwrite order EX, HE, SE, MA: the last one wins, as the reference
        label[masks[..., c] > 0] = c + 1
    return label


def _name_of(batch: dict, index: int) -> str:
    name = batch.get("name")
    if name is None:
        return f"image_{index:04d}"
    name = name[0]
    name = name.decode() if isinstance(name, bytes) else str(name)
    return name or f"image_{index:04d}"




# ----------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------


def evaluate(model, config, *, split: str | None = None, max_images: int | None = None, progress: bool = True,
             forward: Callable | None = None, dataset=None) -> dict[str, Any]:
    """Reference lesion metrics of ``model`` (an ``nnx.Module``, put in eval mode by the caller or here)
    on ``split`` (default ``config.eval.split``) of ``config.data``, or on ``dataset`` (a raw
    ``tf.data.Dataset`` as ``open_split`` returns) when given.

    Each image: the eval pipeline (test-scale resize, normalisation), ``inference`` by
    ``config.model.test_cfg`` (slide or whole), ``probabilities`` at the original size, then the
    streaming accumulator. ``forward``: a compiled forward (``inference.make_forward(model)``) to reuse;
    by default one is made here (``model`` may then be None only if ``forward`` is given).
    ``progress``: print ``[i/n] name seconds`` lines to stderr.

    Returns ``LesionMetricAccumulator.compute()``'s dict (fractions; ``format_table`` prints it) plus
    ``names`` (image names in order), ``pr_curve`` (``thresholds``, ``precision [K, 4]``, ``recall [K, 4]``
    on the fine grid) and ``pr_curve_reference`` (the same on the reference's 11 thresholds).
    """
    import jax
    from flax import nnx

    from hrdecoder_jax.data.pipeline import make_eval_dataset
    from hrdecoder_jax.inference import inference, make_forward, probabilities
    from hrdecoder_jax.metrics import LesionMetricAccumulator

    if forward is None:
        if model is None:
            raise ValueError("evaluate needs a model or a forward function")
        if isinstance(model, nnx.Module):
            model.eval()
            forward = make_forward(model)
        else:
            forward = model
    if dataset is None:
        split = split or config.eval.split
        from hrdecoder_jax.data import open_split
        dataset = open_split(config.data, split)
    if max_images is None:
        max_images = config.eval.max_images
    if max_images is not None:
        dataset = dataset.take(int(max_images))
    total = int(dataset.cardinality())
    total_text = str(total) if total >= 0 else "?"
    test_cfg = config.model.test_cfg
    accumulator = LesionMetricAccumulator(num_fine_thresholds=config.eval.num_fine_thresholds)
    names: list[str] = []
    t_start = time.perf_counter()
    for i, batch in enumerate(make_eval_dataset(dataset, config.data)):
        t0 = time.perf_counter()
        logits = inference(forward, jax.numpy.asarray(batch["image"]), test_cfg)
        orig_size = tuple(int(s) for s in batch["orig_size"][0])
        probs = probabilities(logits, orig_size)[0]                 # [H0, W0, 4]
        if progress:
            probs.block_until_ready()
        accumulator.update(jax.numpy.moveaxis(probs, -1, 0), _label_of(batch))
        del logits, probs
        names.append(_name_of(batch, i))
        if progress:
            print(f"[{i + 1}/{total_text}] {names[-1]} {time.perf_counter() - t0:.1f}s", file=sys.stderr, flush=True)
    if not names:
        from hrdecoder_jax.data.contract import DatasetError
        raise DatasetError(f"the {split or 'given'} split of {config.data.name} has no images "
                           "to evaluate")
    results = accumulator.compute()
    results["names"] = names
    results["pr_curve"] = accumulator.pr_curve("fine")
    results["pr_curve_reference"] = accumulator.pr_curve("reference")
    results["seconds"] = time.perf_counter() - t_start
    return results
