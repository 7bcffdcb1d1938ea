#!/usr/bin/env python
"""The original's side of the full-size prediction row of ``side_by_side.py``: one IDRiD-size photograph
(4288 x 2848) through the original HRDecoder's test path, timed by stage, with the process's peak memory.
Prints one JSON line. Run with the original's interpreter (the environment ``setup_original.sh`` builds):

  $HRD_ORIGINAL/venv/bin/python launch/reference/full_size_original.py [--original DIR] \\
      [--width 48] [--repeats 2] [--threads N]

The model is built by ``original.py`` (beside this file) from the original repository's IDRiD config
(``hrdecoder_fcn_hr48_idrid_2880x1920-slide``: slide 1920 / stride 960, hr_scale 960, sigmoid), random
weights. The stages are the config's test pipeline (``mmcv.imresize`` to 2880 x 1920, bilinear, and
``mmcv.imnormalize``), then the segmentor's ``inference(img, img_meta, rescale=True)``: its
``slide_inference`` (each window's ``encode_decode``, summed and divided by the count) with the resize to
the photo's size, and the sigmoid. ``encode_decode`` is timed per window, and its backbone part
(``extract_feat`` and ``_transform_inputs``: HRNet and the branches upsampled and concatenated) apart,
through wrappers around the methods (no change to what runs). A development tool; nothing of it enters the package.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time

import original


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _photo(h: int, w: int, seed: int = 0):
    """A seeded uint8 RGB image: a bright disc on black with noise (timing does not depend on content)."""
    import numpy as np
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    disc = ((yy - h / 2) ** 2 + (xx - w / 2) ** 2) < (0.45 * h) ** 2
    base = np.array([180, 90, 30], np.float32)[None, None] * disc[..., None]
    return np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--original", default=None, help="the folder setup_original.sh made (default: $HRD_ORIGINAL)")
    p.add_argument("--width", type=int, default=48, choices=[18, 48])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args(argv)

    original.activate(args.original)                # the original's source on sys.path
    import mmcv
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    cfg = original.load_config("hrdecoder", args.width, hr_scale=960, crop_num=2)
    model = original.build(cfg, 0)
    model.eval()
    test_cfg = dict(model.test_cfg)
    scale = (2880, 1920)                                        # (W, H), the config's img_scale
    photo = _photo(2848, 4288)
    mean, std = np.array(original.IDRID_MEAN, np.float32), np.array(original.IDRID_STD, np.float32)

    windows = []
    encode_decode = model.encode_decode

    def timed_encode_decode(*a, **k):
        t0 = time.perf_counter()
        out = encode_decode(*a, **k)
        windows.append(time.perf_counter() - t0)
        return out

    model.encode_decode = timed_encode_decode

    backbone = []                    # HRNet (extract_feat) and the branches upsampled + concatenated

    def timed(method):
        def call(*a, **k):
            t0 = time.perf_counter()
            out = method(*a, **k)
            backbone.append(time.perf_counter() - t0)
            return out
        return call

    model.extract_feat = timed(model.extract_feat)
    model._transform_inputs = timed(model._transform_inputs)

    def predict():
        t0 = time.perf_counter()
        img = mmcv.imresize(photo, scale, interpolation="bilinear")          # Resize(keep_ratio=False)
        img = mmcv.imnormalize(img, mean, std, to_rgb=False)                 # the photo is already RGB
        x = torch.from_numpy(img.transpose(2, 0, 1).copy())[None]
        meta = [dict(ori_shape=photo.shape, img_shape=img.shape, pad_shape=img.shape, flip=False)]
        t1 = time.perf_counter()
        windows.clear()
        backbone.clear()
        with torch.no_grad():
            probs = model.inference(x, meta, rescale=True)                 # slide, resize to the photo, sigmoid
        t2 = time.perf_counter()
        return probs, {"preprocess": t1 - t0, "inference": t2 - t1, "windows": sum(windows),
                       "windows_backbone": sum(backbone),
                       "n_windows": len(windows), "total": t2 - t0}

    rss_before = _rss_mib()
    t0 = time.perf_counter()
    predict()
    first_s = time.perf_counter() - t0
    runs = []
    for _ in range(args.repeats):
        probs, stages = predict()
        runs.append(stages)
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    med["blend_resize_sigmoid"] = med["inference"] - med["windows"]
    print(json.dumps({"what": "fullsize", "impl": "original", "width": args.width, "photo": [2848, 4288],
                      "test_scale": list(scale), "slide": [list(test_cfg["crop_size"]), list(test_cfg["stride"])],
                      "median_s": med["total"], "stages_median_s": med, "runs": [r["total"] for r in runs],
                      "first_call_s": first_s, "rss_before_predict_mib": rss_before,
                      "peak_rss_mib": _peak_rss_mib(), "probs_shape": list(probs.shape),
                      "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "loadavg": os.getloadavg()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
