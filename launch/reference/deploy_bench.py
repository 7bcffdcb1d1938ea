#!/usr/bin/env python
"""Our side of two rows of ``side_by_side.py`` (a development tool; the package never imports it). Prints one
JSON line.

  python launch/reference/deploy_bench.py --what onnx --width 18 --size 1024 --hr-scale 512 [--repeats 5]
      our compiled test-time function (uint8 image -> normalise -> forward -> sigmoid, whole image, batch 1)
      and the same function exported to ONNX (jax2onnx) run by ONNX Runtime on the CPU (all cores)

  python launch/reference/deploy_bench.py --what exported --export DIR [--compare --workdir WORKDIR]
      an export folder (StableHLO through hrdecoder_jax.serving, ONNX through ONNX Runtime) on one
      IDRiD-size photograph: load, first call, median call, peak memory, and the differences

  python launch/reference/deploy_bench.py --what fullsize [--width 48] [--repeats 2]
      predict one IDRiD-size photograph (4288 x 2848 uint8) as ``predict`` does: resize to 2880 x 1920,
      slide windows 1920 / stride 960 (2 windows), HR windows of 960, logits back to 4288 x 2848, sigmoid;
      time of each stage and the process's peak resident memory

Weights are random (timing does not depend on them); the photograph is a seeded synthetic fundus image.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parents[2]


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0      # Linux: kB


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _timed(fn, repeats: int) -> tuple[float, list[float], object]:
    out, times = None, []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times, out


def _config(width: int, overrides=()):
    """configs/idrid.py (HRDecoder, the paper's settings) with the HRNetV2 width ``width``."""
    from hrdecoder_jax import cli
    from hrdecoder_jax.benchmark import with_width

    config = cli.load_config(str(REPO / "configs" / "idrid.py"), list(overrides))
    config.model = with_width(config.model, width)
    return config


def _model(config):
    from flax import nnx

    from hrdecoder_jax.models import build_model
    model = build_model(config.model, rngs=nnx.Rngs(0))
    model.eval()
    return model


def bench_onnx(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import onnxruntime as ort

    from hrdecoder_jax import deploy

    s, hr = args.size, args.hr_scale
    config = _config(args.width, [f"--config.model.hr_settings.hr_scale=({hr}, {hr})",
                                  "--config.model.test_cfg.mode=whole", f"--config.data.test_scale=({s}, {s})"])
    model = _model(config)
    fn = deploy.serving_function(model, config)
    image = np.asarray(np.random.default_rng(0).integers(0, 256, (1, s, s, 3)), np.uint8)
    ours = jax.jit(fn)
    t0 = time.perf_counter()
    jax.block_until_ready(ours(jnp.asarray(image)))
    compile_s = time.perf_counter() - t0
    ours_s, ours_runs, (probs, logits) = _timed(lambda: jax.block_until_ready(ours(jnp.asarray(image))), args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.onnx")
        t0 = time.perf_counter()
        deploy.export_onnx(fn, deploy.input_spec(config), path)
        export_s = time.perf_counter() - t0
        options = ort.SessionOptions()
        options.intra_op_num_threads = os.cpu_count() or 1
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        session.run(None, {"images": image})                                      # warm-up
        ort_s, ort_runs, (ort_probs, ort_logits) = _timed(lambda: session.run(None, {"images": image}), args.repeats)
    return {"what": "onnx", "width": args.width, "size": s, "hr_scale": hr, "ours_s": ours_s,
            "onnxruntime_s": ort_s, "ratio_ort_over_ours": ort_s / ours_s, "ours_runs": ours_runs,
            "ort_runs": ort_runs, "ours_compile_s": compile_s, "onnx_export_s": export_s,
            "max_abs_prob_diff": float(np.abs(np.asarray(probs) - ort_probs).max()),
            "max_rel_logit_diff": float(np.abs(np.asarray(logits) - ort_logits).max() / np.abs(np.asarray(logits)).max()),
            "onnxruntime": ort.__version__, "jax": jax.__version__, "loadavg": os.getloadavg()}


def bench_fullsize(args) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from hrdecoder_jax.data import generate_fundus
    from hrdecoder_jax.inference import inference, make_forward, probabilities
    from hrdecoder_jax.predict import predict_probabilities, preprocess

    config = _config(args.width)
    photo = generate_fundus(0, 2848, 4288)[0]
    model = _model(config)
    forward = make_forward(model)
    rss_before = _rss_mib()
    t0 = time.perf_counter()
    predict_probabilities(forward, photo, config)
    first_s = time.perf_counter() - t0                          # includes tracing and compilation
    stages = {"preprocess": [], "windows": [], "to_photo": [], "total": []}
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        x = jnp.asarray(preprocess(photo, config.data))
        t1 = time.perf_counter()
        logits = jax.block_until_ready(inference(forward, x, config.model.test_cfg))
        t2 = time.perf_counter()
        probs = np.asarray(probabilities(logits, photo.shape[:2])[0], np.float32)
        t3 = time.perf_counter()
        for k, v in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)):
            stages[k].append(v)
    med = {k: statistics.median(v) for k, v in stages.items()}
    if args.split_backbone:
        # Where the windows' time goes: the HRNet backbone on each window's LR image (resize to hr_scale,
        # HRNet, the branches upsampled and concatenated) against the whole forward of the same windows.
        from flax import nnx

        from hrdecoder_jax.models import slide_windows
        tc = config.model.test_cfg
        boxes = slide_windows(x.shape[1:3], tc.crop_size, tc.stride)
        crops = jnp.concatenate([x[:, y1:y2, x1:x2] for (y1, y2, x1, x2) in boxes], axis=0)
        graphdef, state = nnx.split(model)
        backbone = jax.jit(lambda st, im: nnx.merge(graphdef, st).extract_lr_features(im))
        jax.block_until_ready(backbone(state, crops))
        med["windows_backbone"], _, _ = _timed(lambda: jax.block_until_ready(backbone(state, crops)), args.repeats)
        med["windows_forward"], _, _ = _timed(lambda: jax.block_until_ready(forward(crops)), args.repeats)
    return {"what": "fullsize", "impl": "hrdecoder-jax", "width": args.width, "photo": [2848, 4288],
            "test_scale": list(config.data.test_scale), "slide": [list(config.model.test_cfg.crop_size),
                                                                 list(config.model.test_cfg.stride)],
            "median_s": med["total"], "stages_median_s": med, "runs": stages["total"], "first_call_s": first_s,
            "rss_before_predict_mib": rss_before, "peak_rss_mib": _peak_rss_mib(), "probs_shape": list(probs.shape),
            "jax": jax.__version__, "cores": os.cpu_count(), "loadavg": os.getloadavg()}


def bench_exported(args) -> dict:
    """An export folder (``python -m hrdecoder_jax.export``) on one IDRiD-size photograph: load, first call
    (compilation), the median call; the StableHLO artifact through ``serving`` and, when the folder has one,
    the ONNX model in ONNX Runtime (the artifact's own input: the photo at the test scale, batch 1).
    ``--compare``: also the in-package model of the export's config and checkpoint, for the differences."""
    import jax
    import numpy as np

    from hrdecoder_jax import serving
    from hrdecoder_jax.data import generate_fundus

    photo = generate_fundus(0, 2848, 4288)[0]
    manifest = serving.read_manifest(args.export)
    out = {"what": "exported", "export": os.path.basename(os.path.abspath(args.export)),
           "config": manifest["config"]["name"], "test_scale": manifest["input"]["test_scale"]}
    t0 = time.perf_counter()
    model = serving.load(args.export)
    out["stablehlo_load_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.predict(photo)
    out["stablehlo_first_predict_s"] = time.perf_counter() - t0
    out["stablehlo_predict_s"], out["stablehlo_runs"], probs = _timed(lambda: model.predict(photo), args.repeats)
    x = serving.photo_to_input(photo, model.input_size)[None]
    out["stablehlo_call_s"], _, (_, logits) = _timed(lambda: jax.block_until_ready(model(x)), args.repeats)
    out["peak_rss_after_stablehlo_mib"] = _peak_rss_mib()
    if "onnx" in manifest["artifacts"]:
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = os.cpu_count() or 1
        t0 = time.perf_counter()
        session = ort.InferenceSession(os.path.join(args.export, manifest["artifacts"]["onnx"]), options,
                                       providers=["CPUExecutionProvider"])
        out["onnx_load_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        session.run(None, {"images": x})
        out["onnx_first_call_s"] = time.perf_counter() - t0
        out["onnx_call_s"], out["onnx_runs"], (_, ort_logits) = _timed(lambda: session.run(None, {"images": x}),
                                                                    args.repeats)
        out["onnx_vs_stablehlo_max_rel_logit_diff"] = float(
            np.abs(np.asarray(logits) - ort_logits).max() / np.abs(np.asarray(logits)).max())
        out["peak_rss_after_onnx_mib"] = _peak_rss_mib()
    if args.compare:
        from hrdecoder_jax import checkpoint, cli
        from hrdecoder_jax.inference import make_forward
        from hrdecoder_jax.predict import predict_probabilities
        config = cli.load_config(str(REPO / "configs" / manifest["config"]["name"]))
        if args.workdir is None:
            raise SystemExit("--compare needs --workdir (the checkpoint the export was made from)")
        package_model, _ = checkpoint.restore_for_inference(config, args.workdir, manifest["checkpoint"]["step"])
        want = predict_probabilities(make_forward(package_model), photo, config)
        out["stablehlo_vs_predict_max_abs_prob_diff"] = float(np.abs(probs - want).max())
    out.update(jax=jax.__version__, cores=os.cpu_count(), loadavg=os.getloadavg())
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--what", choices=["onnx", "fullsize", "exported"], required=True)
    p.add_argument("--export", help="exported: the export folder")
    p.add_argument("--workdir", help="exported --compare: the checkpoint's workdir")
    p.add_argument("--compare", action="store_true")
    p.add_argument("--split-backbone", action="store_true", help="fullsize: also time the backbone part of "
                   "the windows' forward")
    p.add_argument("--width", type=int, default=18)
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--hr-scale", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    from hrdecoder_jax import runtime
    runtime.configure("inference")
    result = {"onnx": bench_onnx, "fullsize": bench_fullsize, "exported": bench_exported}[args.what](args)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
