"""Speed, memory and FLOPs of a config's model: ``python -m hrdecoder_jax.benchmark --config configs/idrid.py``.

Measures, at the config's paper resolution (training image = ``data.crop_size``; inference image = the
slide window ``model.test_cfg.crop_size`` in slide mode or ``data.test_scale`` in whole mode) or at
``--image_size``:

  params   learnable parameters (BN statistics excluded)
  train    the trainer's own step (``train_step.make_train_step`` with the config's optimiser from
           ``optim.make_optimizer``, jitted by ``train_step.jit_train_step`` as training does; crop boxes
           drawn in-graph from the step number): trace and compile time, median/min step time over
           ``--repeats`` steps, images/s, and the number of compilations over the timed steps (must be 1)
  infer    the compiled eval forward of ``inference.make_forward`` on ``[1, H, W, 3]``: compile time,
           median/min seconds, images/s
  memory   XLA's compiled memory analysis of the train step and of the forward (temp, arguments, outputs,
           aliased/donated; peak estimate = temp + arguments + outputs - aliased), and the device's live peak
           (``memory_stats()['peak_bytes_in_use']``, compile-time autotuning scratch included; None on a CPU)
  flops    XLA cost-analysis FLOPs per image of the forward and of the train step
  input    the input pipeline's samples/s at the config's crop size next to the train step's demand
           (synthetic images at the config's ``data.img_scale`` when the dataset is IDRiD or DDR)

``memory`` and ``flops`` only compile (abstract shapes, nothing runs), so they work for models too big to
execute on the machine at hand; ``memory_infer``/``memory_train``/``flops_infer``/``flops_train`` compile only
one of the two functions (the train step's compilation is the slow one). Examples::

  python -m hrdecoder_jax.benchmark --config configs/tiny.py
  python -m hrdecoder_jax.benchmark --config configs/idrid.py --what infer,flops --image_size 1024,1024 --hr_scale 512
  python -m hrdecoder_jax.benchmark --config configs/idrid.py:efficient --what flops,memory --json out.json
  python -m hrdecoder_jax.benchmark --config configs/idrid.py --width 18 --what infer   # HRNetV2-W18 backbone

``--config.x=y`` overrides any config field, as in training.
"""
from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from hrdecoder_jax import config_utils, runtime
from hrdecoder_jax.inference import make_forward
from hrdecoder_jax.models import build_model, count_params
from hrdecoder_jax.ops import library as cpu_kernels
from hrdecoder_jax.optim import make_optimizer
from hrdecoder_jax.train_step import jit_train_step, make_mesh, make_train_step, merge_model, split_for_training

ALL = ("train", "infer", "memory", "flops", "input")
PARTS = ("memory_train", "memory_infer", "flops_train", "flops_infer")   # one function's memory / FLOPs only
DEFAULT_WHAT = ("train", "infer", "memory", "flops")


def _log(msg: str) -> None:
    print(f"[benchmark] {msg}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------
# Config helpers
# ----------------------------------------------------------------------------------------------------


def with_width(model_cfg: ml_collections.ConfigDict, width: int) -> ml_collections.ConfigDict:
    """``model_cfg`` with the HRNetV2 branch width ``width`` (18, 32, 48 ...), keeping its depth; the head's
    input width follows (and the FCN baseline's ``channels``, which equal it)."""
    m = ml_collections.ConfigDict(model_cfg.to_dict())
    extra = m.backbone.extra
    num_modules = [extra[f"stage{i}"].num_modules for i in range(1, 5)]
    num_blocks = [extra[f"stage{i}"].num_blocks[0] for i in range(1, 5)]
    m.backbone.extra = config_utils.hrnet_extra(width, num_modules=num_modules, num_blocks=num_blocks)
    m.decode_head.in_channels = config_utils.head_in_channels(m)
    if m.type == "FCN":
        m.decode_head.channels = m.decode_head.in_channels      # the FCN baseline's head is that wide
    return m


def _sizes(config, image_size) -> tuple[tuple[int, int], tuple[int, int]]:
    """(training image size, inference image size), both (H, W)."""
    if image_size is not None:
        s = tuple(int(v) for v in image_size)
        return s, s
    train = tuple(int(v) for v in config.data.crop_size)
    tc = config.model.test_cfg
    if tc.mode == "slide":
        infer = tuple(int(v) for v in tc.crop_size)
    else:
        w, h = config.data.test_scale
        infer = (int(h), int(w))
    return train, infer


def _model_config(config, width, hr_scale) -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict(config.model.to_dict())
    if width is not None:
        m = with_width(m, int(width))
    if hr_scale is not None:
        if m.get("hr_settings") is None:
            _log("--hr_scale ignored: the FCN baseline has no hr_settings")
        else:
            hs = (int(hr_scale), int(hr_scale)) if np.isscalar(hr_scale) else tuple(int(v) for v in hr_scale)
            m.hr_settings.hr_scale = hs
    return m


def abstract_model(model_cfg) -> nnx.Module:
    """The model with ``ShapeDtypeStruct`` leaves (nothing allocated). Falls back to a concrete build (with
    a warning) if an initialiser cannot be traced (e.g. one that draws on the host with NumPy)."""
    try:
        return nnx.eval_shape(lambda: build_model(model_cfg, rngs=nnx.Rngs(0)))
    except jax.errors.TracerArrayConversionError as e:
        _log(f"WARNING: the model cannot be built abstractly ({type(e).__name__}: an initialiser converts a "
             "traced key to NumPy); building it with weights instead")
        return build_model(model_cfg, rngs=nnx.Rngs(0))


# ----------------------------------------------------------------------------------------------------
# Jitted functions
# ----------------------------------------------------------------------------------------------------


def _shape_of(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
                        tree)


def _memory(compiled) -> dict[str, int | None]:
    try:
        ma = compiled.memory_analysis()
    except Exception as e:  # some backends do not implement it
        _log(f"memory_analysis unavailable: {e}")
        return {}
    if ma is None:
        return {}
    temp, arg = int(ma.temp_size_in_bytes), int(ma.argument_size_in_bytes)
    out, alias = int(ma.output_size_in_bytes), int(ma.alias_size_in_bytes)
    res = {"temp_bytes": temp, "argument_bytes": arg, "output_bytes": out, "alias_bytes": alias,
           "peak_estimate_bytes": temp + arg + out - alias}
    peak = getattr(ma, "peak_memory_in_bytes", 0)
    if peak and jax.devices()[0].platform != "cpu":   # the CPU backend reports about the argument size only
        res["xla_peak_bytes"] = int(peak)
    return res


def _cost(compiled, key: str = "flops") -> float | None:
    """One figure of XLA's cost analysis of ``compiled``: "flops" or "bytes accessed" (None if absent)."""
    try:
        ca = compiled.cost_analysis()
    except Exception as e:
        _log(f"cost_analysis unavailable: {e}")
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    if not ca or key not in ca:
        return None
    return float(ca[key])


def _time(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return times


# ----------------------------------------------------------------------------------------------------
# Input pipeline
# ----------------------------------------------------------------------------------------------------


def measure_throughput(ds, data_config, global_batch_size: int, num_batches: int, *,
                       warmup_batches: int = 1, seed: int = 0) -> float:
    """Samples per second of one process's training stream (process_count = 1).

    The first ``warmup_batches`` (graph tracing, cache fill, i.e. decoding) are not timed.
    """
    from hrdecoder_jax.data import pipeline

    it = pipeline.make_train_dataset(ds, data_config, global_batch_size=global_batch_size, seed=seed,
                                     process_index=0, process_count=1, raw=True)   # as the trainer reads it
    for _ in range(warmup_batches):
        next(it)
    t0 = time.perf_counter()
    for _ in range(num_batches):
        next(it)
    return num_batches * global_batch_size / (time.perf_counter() - t0)


def measure_input(config, batch: int, num_batches: int = 3, data_dir: str | None = None) -> tuple[float, str]:
    """Samples/s of the training input pipeline at the config's crop size, and a note on the data used."""
    from hrdecoder_jax.data import load_split, synthetic_config

    data_cfg = ml_collections.ConfigDict(config.data.to_dict())
    n = max(batch, 2)
    if data_cfg.name == "synthetic_fundus":
        s = data_cfg.synthetic
        syn = synthetic_config(s.height, s.width, s.num_train, s.num_test, s.seed, s.lesion_scale)
        ddir = os.path.expanduser(data_dir or data_cfg.data_dir or tempfile.mkdtemp(prefix="bench_tfds_"))
        note = f"synthetic_fundus {s.height}x{s.width} ({s.num_train} train images)"
    else:
        w, h = data_cfg.img_scale
        syn = synthetic_config(int(h), int(w), n, 1, 0)
        ddir = data_dir or tempfile.mkdtemp(prefix="bench_tfds_")
        note = (f"SYNTHETIC stand-in for {data_cfg.name}: {n} synthetic_fundus images of {h}x{w} "
                f"(the config's img_scale), not the real dataset")
        _log(f"input: no real {data_cfg.name} data; generating {n} synthetic images of {h}x{w} in {ddir}")
    ds = load_split("synthetic_fundus", "train", data_dir=ddir, config=syn)
    # The steady state of training: decoded base images come from the cache (the pipeline needs one), and
    # every batch pays the augmentation (resize with ratio_range, crop, flip, rotation, normalise, pad).
    # The warm-up epoch fills the cache so the timed batches measure that steady state.
    data_cfg.cache = True
    _log(f"input: warm-up epoch, then timing {num_batches} batches of {batch} ...")
    rate = measure_throughput(ds, data_cfg, batch, num_batches, warmup_batches=max(1, -(-n // batch)))
    return float(rate), note


# ----------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------


def run_benchmark(config: ml_collections.ConfigDict, what: Sequence[str] = DEFAULT_WHAT, repeats: int = 3,
                  batch: int = 1, image_size: Sequence[int] | None = None, hr_scale=None,
                  width: int | None = None, input_batches: int = 3, data_dir: str | None = None,
                  config_name: str | None = None) -> dict[str, Any]:
    """Run the measurements ``what`` (subset of ``ALL``) and return a flat dict (see ``UNITS`` for units).

    ``image_size`` (H, W) overrides both the training and the inference image; ``hr_scale`` (int or (H, W))
    overrides ``model.hr_settings.hr_scale``; ``width`` the HRNetV2 branch width.

    The measurements, in the order of their keys: the train step's compilation, memory and FLOPs
    (``_compile_train_step``), its timing (``_time_train_steps``), the forward's (``_measure_inference``),
    the device's peak memory (``_device_peak``) and the input pipeline against the step (``_measure_input_rate``).
    """
    what = _expand(what)
    dev = jax.devices()[0]
    model_cfg = _model_config(config, width, hr_scale)
    train_size, infer_size = _sizes(config, image_size)
    check = ml_collections.ConfigDict(model_cfg.to_dict())
    if image_size is not None:                 # the image itself is measured, not the config's test window
        check.test_cfg.mode = "whole"
    try:
        config_utils.validate_model_config(check, train_size, infer_size)
    except config_utils.ConfigError as e:
        _log(f"WARNING: these sizes do not validate ({e}); measuring anyway")
    res: dict[str, Any] = {
        "config": config_name, "device_kind": dev.device_kind, "platform": dev.platform,
        "cpu": runtime.cpu_model(), "jax_version": jax.__version__, "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "cpu_kernels": cpu_kernels.in_effect(),
        "model_type": model_cfg.type,
        "width": int(model_cfg.backbone.extra.stage2.num_channels[0]),
        "hr_scale": list(model_cfg.hr_settings.hr_scale) if model_cfg.get("hr_settings") else None,
        "batch": int(batch), "train_image_size": list(train_size), "infer_image_size": list(infer_size),
    }
    run_train = "train" in what or "input" in what
    need_train = run_train or "memory_train" in what or "flops_train" in what
    need_infer = "infer" in what or "memory_infer" in what or "flops_infer" in what
    concrete = run_train or "infer" in what

    _log(f"building {model_cfg.type} (W{res['width']}, hr_scale {res['hr_scale']}) "
         f"{'with weights' if concrete else 'abstractly'} ...")
    model = build_model(model_cfg, rngs=nnx.Rngs(0)) if concrete else abstract_model(model_cfg)
    res["params"] = count_params(model)

    if need_train:
        train = _compile_train_step(res, model, config, what, batch=batch, train_size=train_size,
                                    concrete=concrete)
        if run_train:
            model = _time_train_steps(res, model, config, train, batch=batch, train_size=train_size,
                                      repeats=repeats)
        del train
    if need_infer:
        _measure_inference(res, model, what, infer_size=infer_size, repeats=repeats)
    if "memory_train" in what or "memory_infer" in what:
        _device_peak(res, dev)
    if "input" in what:
        _measure_input_rate(res, config, batch=batch, input_batches=input_batches, data_dir=data_dir)
    return res


def _expand(what: Sequence[str]) -> set[str]:
    """``what`` checked against ``ALL`` and ``PARTS``, with 'memory' and 'flops' standing for both functions'."""
    what = set(what)
    unknown = what - set(ALL) - set(PARTS)
    if unknown:
        raise ValueError(f"unknown measurements {sorted(unknown)}; choose from {ALL + PARTS}")
    for whole in ("memory", "flops"):          # 'flops' = flops of both functions, 'flops_infer' only one
        if whole in what:
            what |= {f"{whole}_train", f"{whole}_infer"}
    return what


@dataclasses.dataclass
class _TrainStep:
    """A compiled train step and what it runs on (the state as the trainer places it)."""
    step: Any
    traces: list
    structure: Any
    params: Any
    rest: Any
    opt_state: Any
    lowered: Any          # kept, like the compiled step, until the timing is done
    compiled: Any


def _compile_train_step(res: dict, model, config, what: set[str], *, batch: int, train_size, concrete: bool
                        ) -> _TrainStep:
    """Trace and compile the trainer's step on ``batch`` raw crops of ``train_size`` (``train_trace_s``,
    ``train_compile_s``), with its memory (``train_mem_*``) and FLOPs when asked for."""
    h, w = train_size
    # What the trainer's step takes: the host pipeline's raw crops (uint8 image, crop sizes, packed masks).
    train_images = {"image": jax.ShapeDtypeStruct((batch, h, w, 3), jnp.uint8),
                    "valid": jax.ShapeDtypeStruct((batch, 2), jnp.int32)}
    train_labels = jax.ShapeDtypeStruct((batch, h, w), jnp.uint8)
    model.train()
    structure, params, rest = split_for_training(model)      # shapes only for an abstract model
    config_utils.validate_optimizer_config(config.optimizer)
    tx = make_optimizer(config.optimizer, config.total_steps)
    opt_state = jax.eval_shape(tx.init, params) if not concrete else tx.init(params)
    traces = []

    def counted(*args):          # counts traces (= compilations of new signatures)
        traces.append(1)
        return step_fn(*args)

    from hrdecoder_jax.data import on_device  # the trainer's device-side end of the input pipeline

    step_fn = make_train_step(structure, tx, seed=config.seed, finish=on_device.make_finish(config.data))
    mesh = make_mesh(jax.devices()[:1])                            # one device: the per-device cost
    step = jit_train_step(counted, mesh)
    if concrete:   # placed as the trainer places them, so the timed calls reuse this compilation
        params, rest, opt_state = jax.device_put((params, rest, opt_state), NamedSharding(mesh, P()))
    args = (_shape_of(params), _shape_of(rest), _shape_of(opt_state), jax.ShapeDtypeStruct((), jnp.int32),
            train_images, train_labels)
    _log(f"compiling the train step on {batch}x{h}x{w} ...")
    t0 = time.perf_counter()
    lowered = step.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    res["train_trace_s"] = t1 - t0
    res["train_compile_s"] = t2 - t1
    _log(f"traced in {t1 - t0:.1f} s, compiled in {t2 - t1:.1f} s")
    if "memory_train" in what:
        res.update({f"train_mem_{k}": v for k, v in _memory(compiled).items()})
    if "flops_train" in what:
        f, b = _cost(compiled, "flops"), _cost(compiled, "bytes accessed")
        res["train_flops_per_image"] = None if f is None else f / batch
        # Against the step time this says whether the step is bound by memory traffic or by arithmetic.
        res["train_bytes_accessed_per_image"] = None if b is None else b / batch
    return _TrainStep(step, traces, structure, params, rest, opt_state, lowered, compiled)


def _time_train_steps(res: dict, model, config, train: _TrainStep, *, batch: int, train_size, repeats: int):
    """One warm-up and ``repeats`` timed train steps on random crops (``train_step_*``, images/s, the
    compilations they caused, the crop draws they made); returns the trained model (the state's buffers
    are donated to the steps)."""
    h, w = train_size
    step, traces = train.step, train.traces
    rng = np.random.default_rng(0)
    images = {"image": jnp.asarray(rng.integers(0, 256, (batch, h, w, 3), dtype=np.uint8)),
              "valid": jnp.asarray(np.tile(np.int32([h, w]), (batch, 1)))}
    labels = jnp.asarray(np.where(rng.random((batch, h, w)) < 0.02,     # one lesion bit per pixel
                                  1 << rng.integers(0, 4, (batch, h, w)), 0).astype(np.uint8))
    state = [train.params, train.rest, train.opt_state]
    train.params = train.rest = train.opt_state = None
    losses = []
    traces_before = len(traces)

    def one(i):
        def call():
            p, r, o, metrics = step(*state, jnp.int32(i), images, labels)
            state[:] = [p, r, o]
            losses.append(metrics["total"])
            return metrics["total"]
        return call

    _log("first (warm-up) train step ...")
    res["train_first_step_s"] = _time(one(0), 1)[0]
    _log(f"timing {repeats} train steps ...")
    times = [_time(one(i + 1), 1)[0] for i in range(repeats)]
    res["train_step_median_s"] = statistics.median(times)
    res["train_step_min_s"] = min(times)
    res["train_images_per_s"] = batch / statistics.median(times)
    # Compilations over the warm-up + timed steps; the lowering traced once.
    res["train_compile_count"] = len(traces) - traces_before + 1
    res["train_jit_cache_size"] = int(step._cache_size())
    if hasattr(model, "sample_crop_boxes"):    # the draws the steps made (the trainer's own rule)
        draw = jax.jit(lambda k: model.sample_crop_boxes(k, train_size))
        base = jax.random.PRNGKey(config.seed)
        draws = {tuple(np.asarray(draw(jax.random.fold_in(base, i))).ravel().tolist())
                 for i in range(repeats + 1)}
        res["train_distinct_crop_draws"] = len(draws)
    res["train_final_loss"] = float(losses[-1])
    return merge_model(train.structure, state[0], state[1])   # the donated buffers are gone


def _measure_inference(res: dict, model, what: set[str], *, infer_size, repeats: int) -> None:
    """Compile the forward on one ``infer_size`` image (``infer_compile_s``), with its memory and FLOPs when
    asked for, and time it (``infer_*``) for 'infer'."""
    infer_images = jax.ShapeDtypeStruct((1, *infer_size, 3), jnp.float32)
    model.eval()
    fwd = make_forward(model)
    _log(f"compiling the forward on 1x{infer_size[0]}x{infer_size[1]} ...")
    t0 = time.perf_counter()
    compiled = fwd.lower(infer_images).compile()
    res["infer_compile_s"] = time.perf_counter() - t0
    _log(f"compiled in {res['infer_compile_s']:.1f} s")
    if "memory_infer" in what:
        res.update({f"infer_mem_{k}": v for k, v in _memory(compiled).items()})
    if "flops_infer" in what:
        res["infer_flops_per_image"] = _cost(compiled, "flops")
    if "infer" in what:
        images = jnp.asarray(np.random.default_rng(1).standard_normal((1, *infer_size, 3), np.float32))
        _log("first (warm-up) forward ...")
        res["infer_first_s"] = _time(lambda: fwd(images), 1)[0]
        _log(f"timing {repeats} forwards ...")
        times = _time(lambda: fwd(images), repeats)
        res["infer_median_s"] = statistics.median(times)
        res["infer_min_s"] = min(times)
        res["infer_images_per_s"] = 1.0 / statistics.median(times)
        res["infer_compile_count"] = fwd.compilations()
    del compiled


def _device_peak(res: dict, dev) -> None:
    """``device_peak_bytes``: the device's peak memory in use (None where the backend does not say)."""
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    res["device_peak_bytes"] = int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def _measure_input_rate(res: dict, config, *, batch: int, input_batches: int, data_dir: str | None) -> None:
    """The host input pipeline's samples/s, and its ratio to the train step's demand (``input_*``)."""
    rate, note = measure_input(config, batch, input_batches, data_dir)
    res["input_samples_per_s"] = rate
    res["input_data"] = note
    demand = res.get("train_images_per_s")
    res["input_over_train_demand"] = rate / demand if demand else None


UNITS = (("_bytes", "bytes"), ("_per_s", "images/s"), ("_flops_per_image", "FLOP/image"),
         ("_bytes_accessed_per_image", "bytes/image"), ("_s", "s"),
         ("params", "parameters"), ("_count", "compilations"), ("_size", ""), ("input_over_train_demand", "x"))


def unit_of(name: str) -> str:
    if name == "input_samples_per_s":
        return "samples/s"
    for suffix, unit in UNITS:
        if name.endswith(suffix):
            return unit
    return ""


def _fmt(name: str, v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        if name.endswith(("_flops_per_image", "_bytes_accessed_per_image")):
            return f"{v / 1e9:,.2f} G"
        return f"{v:.4g}"
    if isinstance(v, int) and name.endswith("_bytes"):
        return f"{v:,} ({v / 2 ** 30:.2f} GiB)"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def format_table(res: dict[str, Any]) -> str:
    rows = [(k, _fmt(k, v), unit_of(k)) for k, v in res.items()]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"{'name':<{w0}}  {'value':>{w1}}  unit", "-" * (w0 + w1 + 14)]
    lines += [f"{n:<{w0}}  {v:>{w1}}  {u}" for n, v, u in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------


def _pair(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    parts = [int(p) for p in str(text).replace("x", ",").split(",")]
    if len(parts) == 1:
        parts *= 2
    if len(parts) != 2:
        raise ValueError(f"expected H,W, got {text!r}")
    return parts[0], parts[1]


def define_flags(fv) -> None:
    from absl import flags
    flags.DEFINE_string("what", ",".join(DEFAULT_WHAT), f"Comma-separated subset of {','.join(ALL)} "
                        f"(or {','.join(PARTS)}).", flag_values=fv)
    flags.DEFINE_integer("batch", 1, "Training batch size (inference uses 1).", flag_values=fv)
    flags.DEFINE_string("image_size", None, "H,W of both the training and the inference image.", flag_values=fv)
    flags.DEFINE_string("hr_scale", None, "Override model.hr_settings.hr_scale (S or H,W).", flag_values=fv)
    flags.DEFINE_integer("width", None, "Override the HRNetV2 width (18, 32, 48).", flag_values=fv)
    flags.DEFINE_integer("repeats", 3, "Timed repetitions.", flag_values=fv)
    flags.DEFINE_integer("input_batches", 3, "Timed batches of the input measurement.", flag_values=fv)
    flags.DEFINE_string("data_dir", None, "tfds data_dir for the input measurement.", flag_values=fv)
    flags.DEFINE_string("json", None, "Also write the results to this JSON file.", flag_values=fv)
    for name in ("image_size", "hr_scale"):
        flags.register_validator(name, lambda v: v is None or _valid_pair(v), message=f"--{name} must be S or H,W",
                                 flag_values=fv)
    flags.register_validator("what", lambda v: not (set(w.strip() for w in v.split(",") if w.strip())
                                                    - set(ALL) - set(PARTS)),
                             message=f"--what takes a subset of {','.join(ALL + PARTS)}", flag_values=fv)


def _valid_pair(text) -> bool:
    try:
        _pair(text)
        return True
    except ValueError:
        return False


def _purpose(what: Sequence[str]) -> str:
    """Time training with training's CPU options and inference with inference's (``runtime``)."""
    return "inference" if set(what) <= {"infer", "memory_infer", "flops_infer"} else "train"


def run(fv) -> int:
    from hrdecoder_jax import cli
    what = tuple(x.strip() for x in fv.what.split(",") if x.strip())
    if fv.json:      # before minutes of measuring, not after
        cli.check_writable_dir(os.path.dirname(os.path.abspath(os.path.expanduser(fv.json))), "--json's folder")
        if os.path.isdir(os.path.expanduser(fv.json)):
            raise cli.CommandError(f"--json {fv.json} is a folder; give a file name")
    dev = jax.devices()[0]
    print(f"device: {dev.device_kind} ({dev.platform}), {jax.device_count()} device(s); jax {jax.__version__}",
          flush=True)
    flag = fv["config"]
    name = flag.config_filename + "".join(f" --config.{k}={v}" for k, v in (flag.override_values or {}).items())
    res = run_benchmark(fv.config, what=what, repeats=fv.repeats, batch=fv.batch, image_size=_pair(fv.image_size),
                        hr_scale=_pair(fv.hr_scale), width=fv.width, input_batches=fv.input_batches,
                        data_dir=fv.data_dir, config_name=name)
    print(format_table(res))
    if fv.json:
        from hrdecoder_jax.workdir import atomic_write
        with atomic_write(os.path.expanduser(fv.json)) as f:
            json.dump(res, f, indent=2)
            f.write("\n")
    print(json.dumps(res), flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hrdecoder_jax.benchmark`` (``argv``: the arguments, without the program name)."""
    from hrdecoder_jax import cli
    argv = list(sys.argv[1:] if argv is None else argv)
    what = next((a.split("=", 1)[1] for a in argv if a.startswith("--what=")), None)
    if what is None and "--what" in argv[:-1]:
        what = argv[argv.index("--what") + 1]
    purpose = _purpose([w.strip() for w in (what or ",".join(DEFAULT_WHAT)).split(",") if w.strip()])
    return cli.main("benchmark", __doc__, define_flags, run, argv, purpose=purpose)


if __name__ == "__main__":
    from hrdecoder_jax.cli import run_as_main
    run_as_main("hrdecoder_jax.benchmark")
