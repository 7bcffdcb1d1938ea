"""Helpers the files in ``configs/`` use: model settings with the reference's field names, and validation.

Field names mirror the mmseg configs users know:
``model.backbone.extra.stage1..4.{num_modules,num_branches,block,num_blocks,num_channels}``,
``model.decode_head.{in_channels,channels,kernel_size,num_convs,compress,concat_input,dropout_ratio,num_classes}``,
``model.hr_settings.{hr_scale,scale_ratio,divisible,crop_num,hr_loss_weight,lr_loss_weight,visual_dim}``,
``model.test_cfg.{mode,crop_size,stride,flip,weighting,sigma_scale}``.
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Mapping, Sequence

import ml_collections

from hrdecoder_jax.errors import ExpectedError

# model.test_cfg.weighting: how overlapping slide windows are averaged. "uniform" is the reference's plain
# mean (the paper's protocol); "gaussian" weights each window by MONAI's importance map (a Gaussian centred
# on the window, sigma = sigma_scale * window size). The defaults live here and nowhere else.
WINDOW_WEIGHTINGS = ("uniform", "gaussian")
DEFAULT_WEIGHTING = "uniform"
DEFAULT_SIGMA_SCALE = 0.125      # MONAI's and nnU-Net's choice (sliding_window_inference(sigma_scale=0.125))


def hrnet_extra(width: int = 48, *, num_modules: Sequence[int] = (1, 1, 4, 3),
                num_blocks: int | Sequence[int] = 4) -> ml_collections.ConfigDict:
    """HRNetV2 ``extra`` dict for branch width ``width`` (18, 32, 48 ...). ``num_modules`` per stage and
    ``num_blocks`` per branch make shallow test variants; the defaults are the standard HRNetV2."""
    blocks = [num_blocks] * 4 if isinstance(num_blocks, int) else list(num_blocks)
    extra = ml_collections.ConfigDict()
    extra.stage1 = dict(num_modules=num_modules[0], num_branches=1, block="BOTTLENECK",
                        num_blocks=(blocks[0],), num_channels=(64,))
    for stage, branches in ((2, 2), (3, 3), (4, 4)):
        extra[f"stage{stage}"] = dict(
            num_modules=num_modules[stage - 1], num_branches=branches, block="BASIC",
            num_blocks=tuple([blocks[stage - 1]] * branches),
            num_channels=tuple(width * 2 ** i for i in range(branches)))
    return extra


def model_config(*, kind: str = "HRDecoder", width: int = 48, hr_scale=(960, 960), crop_num: int = 2,
                 scale_ratio=(0.75, 1.25), divisible: int = 8, hr_loss_weight: float = 0.1,
                 lr_loss_weight: float = 0.0, visual_dim: int | None = None, channels: int = 64,
                 kernel_size: int = 7, num_convs: int = 1, compress: bool = True,
                 num_modules: Sequence[int] = (1, 1, 4, 3), num_blocks: int | Sequence[int] = 4,
                 test_mode: str = "slide", test_crop_size=(1920, 1920), test_stride=(960, 960),
                 test_weighting: str = DEFAULT_WEIGHTING, test_sigma_scale: float = DEFAULT_SIGMA_SCALE,
                 dtype: str = "float32") -> ml_collections.ConfigDict:
    """The model part of a config, with the HRDecoder IDRiD paper settings as defaults."""
    m = ml_collections.ConfigDict()
    m.type = kind                      # HRDecoder | EfficientHRDecoder | FCN
    m.dtype = dtype                    # compute dtype of convolutions; parameters stay float32
    m.backbone = ml_collections.ConfigDict({"type": "HRNet", "extra": hrnet_extra(
        width, num_modules=num_modules, num_blocks=num_blocks)})
    m.decode_head = ml_collections.ConfigDict(dict(
        in_channels=0,                 # set below (head_in_channels): 720 for W48, all branches concatenated
        channels=channels,
        kernel_size=kernel_size,
        num_convs=num_convs,
        compress=compress,             # HRDecoder's 1x1 in->channels conv before the k x k one
        concat_input=False,
        dropout_ratio=-1.0,            # <= 0: no dropout (paper configs)
        num_classes=4,                 # EX, HE, SE, MA; independent sigmoids
        loss_smooth=1e-5,              # dice smoothing of BinaryLoss
    ))
    m.hr_settings = ml_collections.ConfigDict(dict(
        hr_scale=tuple(hr_scale),      # LR input size (H, W); also the HR window / mean crop size
        scale_ratio=tuple(scale_ratio) if scale_ratio else None,   # HR crop size jitter
        divisible=divisible,           # crop sizes and offsets are multiples of this (image px per feature cell)
        crop_num=crop_num,             # M random HR crops per iteration
        hr_loss_weight=hr_loss_weight, # lambda of L = L_fuse + lambda * L_HR
        lr_loss_weight=lr_loss_weight, # an extra LR dice loss when > 0 (0 in the paper configs)
        visual_dim=visual_dim if kind == "EfficientHRDecoder" else None,   # Efficient-HRDecoder width
    ))
    m.test_cfg = ml_collections.ConfigDict(dict(
        mode=test_mode,                # 'slide' or 'whole'
        crop_size=tuple(test_crop_size),
        stride=tuple(test_stride),
        flip=False,                    # horizontal-flip test-time augmentation (not in the reference)
        weighting=test_weighting,      # slide windows averaged 'uniform' (reference) or 'gaussian' (MONAI)
        sigma_scale=test_sigma_scale,  # gaussian: sigma = sigma_scale * window size, per axis
    ))
    m.decode_head.in_channels = head_in_channels(m)
    return m


def fcn_baseline_config(*, width: int = 48, **kwargs) -> ml_collections.ConfigDict:
    """The paper's FCN baselines (``fcn_hr48_*``): resize-concat head with a 1x1 kernel and
    ``channels`` equal to the concatenated width."""
    m = model_config(kind="FCN", width=width, **kwargs)
    m.hr_settings = None
    c = head_in_channels(m)
    m.decode_head.update(in_channels=c, channels=c, kernel_size=1, num_convs=1, compress=False)
    return m


# ----------------------------------------------------------------------------------------------------------
# Shapes a model section implies: the one definition that the config check and the model both use
# ----------------------------------------------------------------------------------------------------------


def head_in_channels(model) -> int:
    """The decode head's input width: the Efficient-HRDecoder compressor's ``hr_settings.visual_dim``, or
    else all HRNet branches upsampled and concatenated (the sum of ``stage4.num_channels``: 15 x width)."""
    hr = model["hr_settings"]
    if model["type"] == "EfficientHRDecoder" and hr is not None and hr.get("visual_dim"):
        return int(hr["visual_dim"])
    return int(sum(model["backbone"]["extra"]["stage4"]["num_channels"]))


def feature_size(hr_scale: Sequence[int]) -> tuple[int, int]:
    """``lr_feat`` spatial size ``(h, w)``: HRNet's stride-4 branch of an ``hr_scale`` image (ceiling
    division, as the stride-2 convolutions round up)."""
    return -(-int(hr_scale[0]) // 4), -(-int(hr_scale[1]) // 4)


def max_hr_crop(hr_scale: Sequence[int], scale_ratio: Sequence[float] | None, divisible: int) -> tuple[int, int]:
    """The largest HR crop side ``(h, w)`` a random draw can give: ``hr_scale`` scaled by less than
    ``scale_ratio[1]`` and floored to a multiple of ``divisible`` (``hr_scale`` itself without a ratio)."""
    if not scale_ratio:
        return tuple(int(s) for s in hr_scale)
    d, top = int(divisible), scale_ratio[1]

    def largest(s):  # ratio < top strictly: an exact multiple s * top is never reached
        n = s * top / d
        return int((math.ceil(n) - 1) * d) if n == int(n) else int(n) * d

    return tuple(largest(s) for s in hr_scale)


def field(cfg, key: str, default=None):
    """``cfg.key`` of a ConfigDict, dict or plain object, or ``default`` when it is absent or None (for
    the optional settings of older configs: the evaluation and data readers use it)."""
    try:
        value = cfg.get(key, default) if hasattr(cfg, "get") else getattr(cfg, key, default)
    except (AttributeError, KeyError):
        return default
    return default if value is None else value


class ConfigError(ExpectedError, ValueError):
    """An invalid setting; the message names the field and says why."""


def window_weighting(test_cfg) -> tuple[str, float]:
    """``(weighting, sigma_scale)`` of a ``model.test_cfg`` (a ConfigDict or a plain dict; the defaults
    above for a dict that has no such keys), validated. Raises ``ConfigError``."""
    weighting = field(test_cfg, "weighting", DEFAULT_WEIGHTING)
    sigma_scale = field(test_cfg, "sigma_scale", DEFAULT_SIGMA_SCALE)
    if weighting not in WINDOW_WEIGHTINGS:
        raise ConfigError(f"model.test_cfg.weighting must be one of {', '.join(map(repr, WINDOW_WEIGHTINGS))}, "
                          f"got {weighting!r}")
    if isinstance(sigma_scale, bool) or not isinstance(sigma_scale, (int, float)) or not sigma_scale > 0:
        raise ConfigError(f"model.test_cfg.sigma_scale={sigma_scale!r} must be a positive number "
                          "(sigma = sigma_scale * window size)")
    return str(weighting), float(sigma_scale)


# ----------------------------------------------------------------------------------------------------------
# A config as flat fields: what a checkpoint records of its model, and what changed between two configs
# ----------------------------------------------------------------------------------------------------------


def flatten(cfg, prefix: str = "") -> dict[str, Any]:
    """``{"a.b.c": value}`` of a ConfigDict, a dict (e.g. a ``config.json`` read back) or None; values made
    JSON-like (tuples are lists), so a config and its stored JSON compare equal."""
    if cfg is None:
        return {}
    if isinstance(cfg, ml_collections.ConfigDict):
        cfg = json.loads(cfg.to_json_best_effort())
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            value = json.loads(value.to_json_best_effort())
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = json.loads(json.dumps(value, default=str))
    return out


def _show(value) -> str:
    if isinstance(value, list):
        return "(" + ", ".join(_show(v) for v in value) + ("," if len(value) == 1 else "") + ")"
    return repr(value) if isinstance(value, str) else str(value)


def changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``["total_steps 300 -> 800", ...]``: the fields of two ``flatten``ed configs that differ, in field order
    (a field only one of them has shows as ``(absent)``)."""
    out = []
    for key in list(old) + [k for k in new if k not in old]:
        a, b = old.get(key, "(absent)"), new.get(key, "(absent)")
        if a != b:
            out.append(f"{key} {a if a == '(absent)' else _show(a)} -> {b if b == '(absent)' else _show(b)}")
    return out


# Model settings that neither change the parameters nor what the trained network computes: a checkpoint
# restores under other values of them (another test-time window or compute dtype, training-only settings).
RUNTIME_MODEL_FIELDS = ("dtype", "test_cfg", "hr_settings.crop_num", "hr_settings.scale_ratio",
                        "hr_settings.divisible", "hr_settings.hr_loss_weight", "hr_settings.lr_loss_weight",
                        "decode_head.loss_smooth", "decode_head.dropout_ratio")


def model_identity(model) -> dict[str, Any]:
    """The settings of a model section that define the model a checkpoint holds (its type, architecture,
    HR settings): ``flatten(model)`` with keys ``model.*``, less ``RUNTIME_MODEL_FIELDS``. Takes a ConfigDict
    or a stored dict (such as a checkpoint's ``meta["model_config"]``, already flat, or a nested one)."""
    if isinstance(model, Mapping) and model and all(str(k).startswith("model.") for k in model):
        flat = dict(model)
    else:
        flat = flatten(model, "model.")
    runtime = tuple(f"model.{f}" for f in RUNTIME_MODEL_FIELDS)
    return {k: v for k, v in flat.items() if not any(k == r or k.startswith(r + ".") for r in runtime)}


def model_digest(model) -> str:
    """A short digest of ``model_identity(model)``: equal exactly when two model sections define the same model."""
    text = json.dumps(model_identity(model), sort_keys=True)
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


def validate_model_config(model: ml_collections.ConfigDict, train_size: Sequence[int] | None = None,
                          test_size: Sequence[int] | None = None) -> None:
    """Check that crop, window and image sizes map exactly onto the feature grid. Raises ``ConfigError``.

    ``train_size``: the training image (crop) size ``(H, W)`` the model will see; ``test_size`` the test
    image size ``(H, W)`` of whole-image inference.
    """
    window_weighting(model.test_cfg)
    head = model.decode_head
    expected_in = head_in_channels(model)
    if model.type == "FCN":
        if head.in_channels != expected_in:
            raise ConfigError(f"model.decode_head.in_channels={head.in_channels} but the backbone "
                              f"concatenates {expected_in} channels")
        return
    hr = model.hr_settings
    if head.in_channels != expected_in:
        raise ConfigError(f"model.decode_head.in_channels={head.in_channels} but the "
                          f"{'compressor' if model.type == 'EfficientHRDecoder' else 'backbone'} gives "
                          f"{expected_in} channels")
    d = hr.divisible
    hr_scale = tuple(hr.hr_scale)
    for s in hr_scale:
        if s % 32:
            raise ConfigError(f"model.hr_settings.hr_scale={hr_scale}: each side must be a multiple of 32 "
                              "so every HRNet branch halves exactly")
        if s % d:
            raise ConfigError(f"model.hr_settings.hr_scale={hr_scale} is not divisible by "
                              f"model.hr_settings.divisible={d}")
    if hr.scale_ratio is not None:
        lo, hi = hr.scale_ratio
        if not 0 < lo <= hi:
            raise ConfigError(f"model.hr_settings.scale_ratio={tuple(hr.scale_ratio)} must satisfy 0 < min <= max")
    sizes = {"training crop (data.crop_size)": train_size}
    if model.test_cfg.mode == "slide":
        sizes["model.test_cfg.crop_size"] = model.test_cfg.crop_size
    elif test_size is not None:
        sizes["test image (data.test_scale, whole mode)"] = test_size
    for name, size in sizes.items():
        if size is None:
            continue
        for side, s, feat in zip(("height", "width"), size, feature_size(hr_scale)):
            if s % feat or (s // feat) and d % (s // feat):
                raise ConfigError(
                    f"{name}={tuple(size)}: the {side} {s} must be a multiple of the feature size {feat} "
                    f"(hr_scale/4) with a ratio dividing divisible={d}, so boxes map exactly onto the feature grid")
        if hr.scale_ratio is not None:
            top = max(max_hr_crop(hr_scale, hr.scale_ratio, d))
            if name.startswith("training") and top > min(size):
                raise ConfigError(f"{name}={tuple(size)} is smaller than the largest HR crop {top} "
                                  "(hr_scale x scale_ratio max)")


# data.label_mode: the fused reference label (int32 0..4) or the four masks.
LABEL_MODES = ("overwrite", "multilabel")
# data.validate_on: the held-out split, or the test split (the reference's checkpoint selection).
VALIDATE_ON = ("val", "test")
# optimizer.name (optim.make_optimizer).
OPTIMIZERS = ("sgd", "adamw")

IDRID_MEAN = (116.513, 56.437, 16.309)
IDRID_STD = (80.206, 41.232, 13.293)
DDR_MEAN = (81.205, 50.636, 21.216)
DDR_STD = (76.252, 48.798, 21.625)


def default_data_config() -> ml_collections.ConfigDict:
    """Data config of the IDRiD paper config (``hrdecoder_fcn_hr48_idrid_2880x1920-slide``).

    Fields:
      name, data_dir, manual_dir: tfds dataset name and directories (used by the caller).
      img_scale: (W, H) base scale of the training Resize.
      ratio_range: (lo, hi) of the resize ratio r ~ U[lo, hi); None for r = 1.
      crop_size: (H, W) of RandomCrop and Pad.
      cat_max_ratio: RandomCrop's max share of one class (>= 1 disables the re-draws).
      flip_prob, rotate_prob, rotate_degree: RandomFlip / RandomRotate (degree d -> U(-d, d), or a
        (lo, hi) pair).
      mean, std: normalisation in RGB order.
      quantize_uint8: round the image to the uint8 grid after resize and rotation, as cv2 does on
        the reference's uint8 images.
      test_scale: (W, H) of the test Resize (keep_ratio=False).
      label_mode: "overwrite" (int32 label 0..4, MA > SE > HE > EX) or "multilabel" (uint8 masks).
      val_fraction, val_count, val_seed: held-out validation split of the training split
        (val_count, if set, wins over val_fraction).
      validate_on: "val" (held-out split) or "test" (the reference: select checkpoints on test).
      cache: True / "memory" (in-memory cache), or a directory path (one file per example, in a
        sub-folder named by a fingerprint of the data it holds, so datasets never share one).
      num_parallel_calls: parallelism of the per-example maps (-1 = AUTOTUNE).
      prefetch: batches to prefetch (-1 = AUTOTUNE).
    """
    cfg = ml_collections.ConfigDict()
    cfg.name = "idrid"
    cfg.data_dir = ""
    cfg.manual_dir = ml_collections.FieldReference(None, field_type=str)
    cfg.img_scale = (2880, 1920)
    cfg.ratio_range = (0.5, 2.0)
    cfg.crop_size = (1920, 1920)
    cfg.cat_max_ratio = 0.75
    cfg.flip_prob = 0.5
    cfg.rotate_prob = 1.0
    cfg.rotate_degree = ml_collections.FieldReference(45.0, field_type=object)  # d or (lo, hi)
    cfg.mean = IDRID_MEAN
    cfg.std = IDRID_STD
    cfg.quantize_uint8 = True
    cfg.test_scale = (2880, 1920)
    cfg.label_mode = "overwrite"
    cfg.val_fraction = 0.1
    cfg.val_count = ml_collections.FieldReference(None, field_type=int)
    cfg.val_seed = 0
    cfg.validate_on = "val"
    # bool or str: a FieldReference of type object lets a command-line override switch kinds.
    cfg.cache = ml_collections.FieldReference(True, field_type=object)
    cfg.num_parallel_calls = -1
    cfg.prefetch = 2
    return cfg


def ddr_data_config() -> ml_collections.ConfigDict:
    """Data config of the DDR paper config (2048x2048 scales and crop, DDR statistics)."""
    cfg = default_data_config()
    cfg.name = "ddr"
    cfg.img_scale = (2048, 2048)
    cfg.crop_size = (2048, 2048)
    cfg.test_scale = (2048, 2048)
    cfg.mean = DDR_MEAN
    cfg.std = DDR_STD
    return cfg


def synthetic_data_config(*, image_size=(512, 512), num_train: int = 48, num_test: int = 16, seed: int = 0,
                          lesion_scale: float = 1.0, crop_size=None, ratio_range=(0.5, 2.0),
                          ) -> ml_collections.ConfigDict:
    """Data settings for the built-in ``synthetic_fundus`` dataset (generated on first use, no download).

    The augmentation is the paper's (resize with ``ratio_range``, crop, flip, rotation), at the
    synthetic image size; ``crop_size`` defaults to the image size.
    """
    d = default_data_config()
    d.name = "synthetic_fundus"
    d.data_dir = "~/tensorflow_datasets"
    h, w = image_size
    d.img_scale = (w, h)                       # (W, H) as mmseg's img_scale
    d.test_scale = (w, h)
    d.crop_size = tuple(crop_size or image_size)
    d.ratio_range = tuple(ratio_range) if ratio_range else None
    d.synthetic = ml_collections.ConfigDict(dict(
        height=h, width=w, num_train=num_train, num_test=num_test, seed=seed, lesion_scale=lesion_scale))
    return d


def optimizer_config() -> ml_collections.ConfigDict:
    """The reference schedule: SGD lr 0.01, momentum 0.9, coupled weight decay 5e-4 on every
    parameter, poly decay (power 1) to 0 with 1500 linear warm-up iterations from ratio 1e-6."""
    return ml_collections.ConfigDict(dict(
        name="sgd",                  # 'sgd' (reference) or 'adamw'
        lr=0.01,
        momentum=0.9,
        weight_decay=5e-4,           # sgd: coupled L2 as PyTorch; adamw: decoupled
        power=1.0,                   # poly exponent
        min_lr=0.0,
        warmup_steps=1500,
        warmup_ratio=1e-6,
        b1=0.9, b2=0.999,            # adamw only
    ))


def smoke_schedule(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` set to the seconds-long runs of the tests and smoke checks (``configs/tiny.py``,
    ``configs/synthetic.py:toy``): 4 steps of batch 4 (2 of warm-up), logged every step, validated on one
    held-out image and saved every 2 steps. Returns ``config``."""
    config.data.val_count = 1
    config.total_steps = 4
    config.global_batch_size = 4
    config.log_every = 1
    config.eval_every = 2
    config.checkpoint_every = 2
    config.optimizer.warmup_steps = 2
    return config


def base_config() -> ml_collections.ConfigDict:
    """Every field a training config has, with the IDRiD paper values; config files override parts.

    Model and data sections are filled by the config file (``model_config`` / data helpers).
    """
    c = ml_collections.ConfigDict()
    c.seed = 2                       # the reference's seed for the IDRiD configs
    c.total_steps = 20000            # iterations (IterBasedRunner)
    c.global_batch_size = 4          # 4 GPUs x 1 image in the paper; split over all devices of all hosts
    c.grad_accum_steps = 1           # micro-batches per optimiser step (small GPUs); batch is split
    c.optimizer = optimizer_config()
    c.log_every = 100                # progress line and metrics log (steps)
    c.eval_every = 2000              # validation (steps); 0 disables
    c.checkpoint_every = 1000        # checkpoint (steps)
    c.keep_best = True               # also keep the best-by-validation-mIoU checkpoint
    c.resume_from = ml_collections.FieldReference(None, field_type=str)   # a workdir or checkpoint dir to continue
    c.init_from = ml_collections.FieldReference(None, field_type=str)     # converted/ PyTorch weights (.pth/.npz/workdir)
    c.eval = ml_collections.ConfigDict(dict(
        split="test",                # split the evaluate command scores
        max_images=ml_collections.FieldReference(None, field_type=int),   # cap for quick looks
        num_fine_thresholds=101,     # extra fine-grained AUPR beside the reference's 11 thresholds
    ))
    c.model = model_config()
    return c


def _check_pair(name: str, value, *, positive: bool = True) -> None:
    """``value`` must be two numbers (H, W or W, H), positive ones when ``positive``."""
    try:
        ok = len(value) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    except TypeError:
        ok = False
    if not ok or (positive and min(value) <= 0):
        raise ConfigError(f"{name}={value!r} must be two {'positive ' if positive else ''}numbers, e.g. (512, 512)")


def validate_data_config(data: ml_collections.ConfigDict) -> None:
    """The shapes of the data settings (the pipeline would fail deep inside TensorFlow otherwise)."""
    val_count = data.get("val_count")
    if val_count is not None and (isinstance(val_count, bool) or not isinstance(val_count, int) or val_count < 0):
        raise ConfigError(f"data.val_count={val_count!r} must be a number of images >= 0 (or None to use "
                          "data.val_fraction)")
    frac = data.get("val_fraction", 0.0)
    if not isinstance(frac, (int, float)) or not 0 <= frac < 1:
        raise ConfigError(f"data.val_fraction={frac!r} must be in [0, 1)")
    for name in ("crop_size", "img_scale", "test_scale"):
        _check_pair(f"data.{name}", data[name])
    if data.get("ratio_range") is not None:
        _check_pair("data.ratio_range", data.ratio_range)
        if data.ratio_range[0] > data.ratio_range[1]:
            raise ConfigError(f"data.ratio_range={tuple(data.ratio_range)} must satisfy min <= max")
    for name in ("mean", "std"):
        if len(data[name]) != 3:
            raise ConfigError(f"data.{name}={tuple(data[name])!r} needs one value per RGB channel")
    if min(data.std) <= 0:
        raise ConfigError(f"data.std={tuple(data.std)} must be positive")
    _check_choice("data.validate_on", data.validate_on, VALIDATE_ON)
    _check_choice("data.label_mode", data.label_mode, LABEL_MODES)


def validate_optimizer_config(opt: ml_collections.ConfigDict) -> None:
    """The optimiser's name (``make_optimizer`` builds what this lets through). Raises ``ConfigError``."""
    _check_choice("optimizer.name", opt.name, OPTIMIZERS)


def _check_choice(name: str, value, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be {' or '.join(map(repr, choices))}, got {value!r}")


SECTIONS = {"model": "config_utils.model_config(...)",
            "data": "config_utils.synthetic_data_config(...) or default_data_config()",
            "optimizer": "config_utils.optimizer_config()", "eval": "config_utils.base_config().eval"}


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Validate a whole training config (model against the data sizes). Raises ``ConfigError``."""
    for name, helper in SECTIONS.items():
        if not isinstance(field(config, name), (ml_collections.ConfigDict, dict)):
            raise ConfigError(f"the config has no '{name}' section: set config.{name} (e.g. {helper}) in its "
                              "get_config()")
    max_images = field(config.eval, "max_images")
    if max_images is not None and (isinstance(max_images, bool) or not isinstance(max_images, int)
                                   or max_images < 1):
        raise ConfigError(f"eval.max_images={max_images!r} must be >= 1 (or None for every image)")
    validate_data_config(config.data)
    for name in ("total_steps", "log_every", "checkpoint_every"):
        if config[name] < 1:
            raise ConfigError(f"{name}={config[name]} must be >= 1")
    if config.eval_every < 0:
        raise ConfigError(f"eval_every={config.eval_every} must be >= 0 (0 disables validation)")
    if config.global_batch_size < 1:
        raise ConfigError(f"global_batch_size={config.global_batch_size} must be >= 1")
    if config.grad_accum_steps < 1 or config.global_batch_size % config.grad_accum_steps:
        raise ConfigError(f"grad_accum_steps={config.grad_accum_steps} must divide "
                          f"global_batch_size={config.global_batch_size}")
    validate_optimizer_config(config.optimizer)
    w, h = config.data.test_scale
    validate_model_config(config.model, tuple(config.data.crop_size), (h, w))
