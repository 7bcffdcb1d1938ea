"""Input-pipeline throughput: how many training samples per second ``make_train_dataset`` delivers.

Usage (synthetic IDRiD-sized images, no dataset needed)::

    python -m hrdecoder_jax.data.bench_input --num_images 4 --height 2848 --width 4288 --batch 4 --batches 10
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import tensorflow as tf

from hrdecoder_jax.data import pipeline


def measure_throughput(ds: tf.data.Dataset, data_config, global_batch_size: int, num_batches: int, *,
                       warmup_batches: int = 1, seed: int = 0) -> float:
    """Samples per second of one process's training stream (process_count = 1).

    The first ``warmup_batches`` (graph tracing, cache fill, i.e. decoding) are not timed.
    """
    it = pipeline.make_train_dataset(ds, data_config, global_batch_size=global_batch_size, seed=seed,
                                     process_index=0, process_count=1)
    for _ in range(warmup_batches):
        next(it)
    t0 = time.perf_counter()
    for _ in range(num_batches):
        next(it)
    return num_batches * global_batch_size / (time.perf_counter() - t0)


def synthetic_dataset(num_images: int, height: int, width: int, seed: int = 0) -> tf.data.Dataset:
    """Random uint8 images and sparse 0/1 masks in the tfds builders' format."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (num_images, height, width, 3), dtype=np.uint8)
    masks = (rng.random((num_images, height, width, 4)) < 0.01).astype(np.uint8)
    names = [f"synthetic_{i}" for i in range(num_images)]
    return tf.data.Dataset.from_tensor_slices({"image": images, "masks": masks, "name": names})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", choices=("idrid", "ddr"), default="idrid")
    p.add_argument("--num_images", type=int, default=4)
    p.add_argument("--height", type=int, default=2848)
    p.add_argument("--width", type=int, default=4288)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--batches", type=int, default=10)
    args = p.parse_args(argv)
    cfg = pipeline.default_data_config() if args.config == "idrid" else pipeline.ddr_data_config()
    ds = synthetic_dataset(args.num_images, args.height, args.width)
    rate = measure_throughput(ds, cfg, args.batch, args.batches)
    print(f"{rate:.2f} samples/s ({args.config}, {args.height}x{args.width}, batch {args.batch})")


if __name__ == "__main__":
    main()
