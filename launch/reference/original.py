#!/usr/bin/env python
"""The ORIGINAL PyTorch HRDecoder (CVIU-CSU/HRDecoder) as the tools of ``launch/reference/`` use it.

Development only: run with the interpreter of the environment ``setup_original.sh`` builds
(``$HRD_ORIGINAL/venv/bin/python``); this project's package and tests never import this module, and this
module never changes the original's files. It puts the original's source (``$HRD_ORIGINAL/src``) first on
``sys.path`` and its two stand-ins (``$HRD_ORIGINAL/stubs``) last, and drives the original through its own
machinery: its config files (``mmcv.Config``), its model registry, its ``init_weights``, its segmentor
methods, losses and metrics. Nothing of the model is re-implemented here. The other scripts of this folder
import it (``import original``; it sits beside them).

Commands (``--original DIR`` before the command overrides ``$HRD_ORIGINAL``; ``--help`` after it lists
its flags; ``tests/fixtures/README.md`` gives the command of every fixture):

  check      import the original, build a small HRDecoder from its IDRiD config, run it once
  export     float32 export of the HRDecoder config (any width, depth, size, crops, seed; seeded init or
             --weights FILE): <tag>_seed<seed>_state_dict.pth and <tag>_io.npz (input, backbone features,
             LR / window / fused logits, one training forward: losses, crop draws, some gradients)
  float64    rerun an export's weights and input in float64: fused logits, losses with the same crop
             draws, gradients, the decode head's BN statistics
  state-npz  a .pth state_dict as .npz arrays (for readers without torch)
  metrics    the original's lesion metrics of stored probability / label maps
  time       time eval encode_decode and / or a training step (JSON lines; side_by_side.py runs it)
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import json
import logging
import os
import sys
import tempfile
import warnings

ENV = "HRD_ORIGINAL"
# The original's config files the fixtures use, by the name the tools give them.
CONFIG_FILES = {
    "hrdecoder": "configs/lesion/hrdecoder_fcn_hr48_idrid_2880x1920-slide.py",
    "efficient": "configs/lesion/efficient-hrdecoder_fcn_hr48_idrid_2880x1920-slide.py",
    "fcn": "configs/lesion/fcn_hr48_idrid_1440x960.py",
}
STAGES = ("stage1", "stage2", "stage3", "stage4")

_root = None


def default_root() -> str:
    return os.environ.get(ENV) or os.path.join(tempfile.gettempdir(), "hrdecoder-original")


def interpreter(root: str | None = None) -> str:
    """The Python of the environment setup_original.sh made in ``root`` (for tools that run under this
    project's interpreter and start the original as a subprocess)."""
    return os.path.join(os.path.abspath(root or default_root()), "venv", "bin", "python")


def add_location_arguments(parser) -> None:
    """``--original`` and ``--reference-python`` of the tools that run the original in a subprocess."""
    parser.add_argument("--original", default=None, help="the folder setup_original.sh made (default: "
                        "$HRD_ORIGINAL, else <temp dir>/hrdecoder-original)")
    parser.add_argument("--reference-python", default=None, help="the original's interpreter (default: the "
                        "environment in --original)")


def located(args) -> tuple[str, str]:
    """``(the original's folder, its interpreter)`` from ``add_location_arguments``' flags."""
    root = os.path.abspath(args.original or default_root())
    return root, args.reference_python or interpreter(root)


def activate(root: str | None = None) -> str:
    """Make the original importable from ``root`` (the folder setup_original.sh filled); returns its source
    folder. Idempotent; a second call with another root is an error (one original per process)."""
    global _root
    if root is None and _root is not None:      # already loaded (from --original): that one
        return os.path.join(_root, "src")
    root = os.path.abspath(root or default_root())
    if _root is not None:
        if root != _root:
            raise RuntimeError(f"the original is already loaded from {_root}")
        return os.path.join(root, "src")
    src, stubs = os.path.join(root, "src"), os.path.join(root, "stubs")
    if not os.path.isfile(os.path.join(src, "mmseg", "__init__.py")):
        raise SystemExit(f"no original HRDecoder in {root}: run launch/reference/setup_original.sh first "
                         f"(or point {ENV} / --original at the folder it made)")
    sys.path.insert(0, src)
    sys.path.append(stubs)          # last: a real torchvision / tkinter, where installed, comes first
    warnings.filterwarnings("ignore")
    for name in ("mmcv", "mmengine", "mmseg"):
        logging.getLogger(name).setLevel(logging.ERROR)
    _root = root
    return src


def source_commit() -> str | None:
    try:
        with open(os.path.join(_root, "src", ".commit")) as f:
            return f.read().strip()
    except (OSError, TypeError):
        return None


def _quiet_mmcv_logger():
    from mmcv.utils import get_logger
    get_logger("mmcv").setLevel(logging.ERROR)        # init_weights reports every layer otherwise


# ------------------------------------------------------------------------------------------------ configs
def hrnet_channels(width: int, branches: int) -> tuple:
    """HRNetV2 branch widths: ``width`` doubled per branch (W18: 18/36/72/144, W48: 48/96/192/384)."""
    return tuple(width * 2 ** i for i in range(branches))


def load_config(kind: str, width: int = 48, *, blocks: int | None = None, modules: int | None = None,
                hr_scale: int | None = None, crop_num: int | None = None, scale_ratio=None,
                visual_dim: int | None = None, num_classes: int = 4):
    """The original's config file ``CONFIG_FILES[kind]`` with the sizes a fixture needs changed.

    ``width``: HRNet width (every stage's branches, and the head's input channels that follow from them).
    ``blocks`` / ``modules``: residual blocks per branch / HRNet modules in every stage (None: the config's).
    ``hr_scale``, ``crop_num``, ``scale_ratio`` (a float or a (lo, hi) pair): the HRDecoder settings, None
    keeps the config's; ``visual_dim``: Efficient-HRDecoder's compressed width. SyncBN becomes BN (the same
    maths on one process) and no pretrained weights are named."""
    from mmcv import Config
    cfg = Config.fromfile(os.path.join(activate(), CONFIG_FILES[kind]))
    model = cfg.model
    model.pretrained = None
    norm = dict(type="BN", requires_grad=True)
    model.backbone.norm_cfg = norm
    model.decode_head.norm_cfg = norm
    model.decode_head.num_classes = num_classes
    for stage in STAGES:
        extra = model.backbone.extra[stage]
        if blocks is not None:
            extra.num_blocks = (blocks,) * len(extra.num_blocks)
        if modules is not None:
            extra.num_modules = modules
        if stage != "stage1":                                 # stage1 is the 64-channel Bottleneck stage
            extra.num_channels = hrnet_channels(width, extra.num_branches)
    channels = hrnet_channels(width, model.backbone.extra.stage4.num_branches)
    if kind == "fcn":                                         # FCN: resize_concat of the four branches
        model.decode_head.in_channels = list(channels)
        model.decode_head.channels = sum(channels)
        return cfg
    hr = model.hr_settings
    if hr_scale is not None:
        hr.hr_scale = (hr_scale, hr_scale)
    if crop_num is not None:
        hr.crop_num = crop_num
    if scale_ratio is not None:
        hr.scale_ratio = scale_ratio
    if kind == "efficient":                                   # concat -> 1x1 compressor -> head
        hr.in_channels = sum(channels)
        if visual_dim is not None:
            hr.visual_dim = visual_dim
        model.decode_head.in_channels = model.decode_head.channels = hr.visual_dim
    else:
        model.decode_head.in_channels = sum(channels)
    return cfg


def build(cfg, seed: int):
    """The segmentor of ``cfg`` with the original's initialisation, as its training script makes it: the
    torch and numpy seeds set, the model built through the registry, then ``init_weights()``."""
    import numpy as np
    import torch
    from mmseg.models.builder import build_train_model
    _quiet_mmcv_logger()
    cfg = copy.deepcopy(cfg)            # the HRDecoder pops crop_num / scale_ratio out of its config
    torch.manual_seed(seed)
    np.random.seed(seed)
    model = build_train_model(cfg, train_cfg=cfg.get("train_cfg"), test_cfg=cfg.get("test_cfg"))
    model.init_weights()
    return model


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def calibrate_bn(model, image, metas, passes: int = 1):
    """Give freshly initialised BN layers usable running statistics (mean 0 / var 1 make eval activations
    blow up at this depth): reset them, then run ``passes`` train-mode ``encode_decode`` calls on ``image``
    with ``momentum=None``, PyTorch's cumulative average, so every layer ends with the exact mean of the
    batch statistics of all its calls. Momentum is restored and the batch counters zeroed afterwards; only
    the buffers change."""
    import torch
    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(passes):
            model.encode_decode(image, metas)
    for m, momentum in zip(layers, saved):
        m.momentum = momentum
        m.num_batches_tracked.zero_()


# ------------------------------------------------------------------------------------------------- inputs
def seeded_image(seed: int, shape):
    """A float32 NCHW image of N(0, 1) values (an already normalised input) from ``RandomState(seed + 12345)``."""
    import numpy as np
    return np.random.RandomState(seed + 12345).standard_normal(shape).astype(np.float32)


def seeded_label(seed: int, shape, num_classes: int = 4, block: int = 32):
    """An (N, 1, H, W) int64 label map of ``block``-pixel squares, each 0 (background) .. ``num_classes``,
    from ``RandomState(seed + 777)``."""
    import numpy as np
    n, _, h, w = shape
    coarse = np.random.RandomState(seed + 777).randint(0, num_classes + 1, (n, 1, -(-h // block), -(-w // block)))
    return np.ascontiguousarray(np.kron(coarse, np.ones((1, 1, block, block), np.int64))[:, :, :h, :w])


def image_metas(n: int, h: int, w: int):
    return [dict(ori_shape=(h, w, 3), img_shape=(h, w, 3), pad_shape=(h, w, 3), flip=False, scale_factor=1.0)
            for _ in range(n)]


# ------------------------------------------------------------------------------------------------ running
def hrdecoder_module():
    return importlib.import_module("mmseg.models.segmentors.HRDecoder")


@contextlib.contextmanager
def recorded_crop_draws():
    """Record the HRDecoder's random training crops while they are drawn: the crop size of each
    ``get_random_hr_scale`` call and each box ``[y1, y2, x1, x2]`` of the module's ``get_crop_bbox``. The
    original functions run unchanged (same numpy draws); they are only wrapped for the duration."""
    module = hrdecoder_module()
    record = dict(hr_scale=[], boxes=[])
    draw_box, draw_scale = module.get_crop_bbox, module.HRDecoder.get_random_hr_scale

    def box(*args, **kwargs):
        out = draw_box(*args, **kwargs)
        record["boxes"].append([int(v) for v in out])
        return out

    def scale(self):
        out = draw_scale(self)
        record["hr_scale"].append([int(v) for v in out])
        return out

    module.get_crop_bbox, module.HRDecoder.get_random_hr_scale = box, scale
    try:
        yield record
    finally:
        module.get_crop_bbox, module.HRDecoder.get_random_hr_scale = draw_box, draw_scale


@contextlib.contextmanager
def float64_losses():
    """The original's binary dice loss casts its prediction with ``.float()`` (to float32). For a float64
    run, make ``.float()`` leave float64 tensors as they are while this is active; float32 and integer
    tensors convert exactly as before, so nothing else changes."""
    import torch
    cast = torch.Tensor.float

    def keep_float64(self, *args, **kwargs):
        return self if self.dtype == torch.float64 else cast(self, *args, **kwargs)

    torch.Tensor.float = keep_float64
    try:
        yield
    finally:
        torch.Tensor.float = cast


def train_forward(model, image, metas, label, train_seed: int):
    """One ``forward_train`` with numpy's and torch's seeds set to ``train_seed`` just before (the crop draws
    are numpy's); returns (the loss dict, the total of ``_parse_losses``, the recorded crop draws)."""
    import numpy as np
    import torch
    np.random.seed(train_seed)
    torch.manual_seed(train_seed)
    with recorded_crop_draws() as draws:
        losses = model.forward_train(image, metas, label)
    total, _ = model._parse_losses(losses)
    return losses, total, draws


def load_weights(model, path: str) -> None:
    """Load a state_dict with the original's (mmseg) key names into ``model``, strictly: a ``.pth`` saved by
    ``torch.save`` (this module's exports, an mmseg checkpoint with a ``state_dict`` entry) or an ``.npz`` of
    NumPy arrays under the same keys (what a JAX-side exporter writes without torch)."""
    import numpy as np
    import torch
    if path.endswith(".npz"):
        with np.load(path) as data:
            state = {k: torch.from_numpy(np.array(data[k])) for k in data.files}
    else:
        state = torch.load(path, map_location="cpu")
        state = state.get("state_dict", state)
    model.load_state_dict(state)


def fresh_model(cfg, seed: int, weights: str | None, calib_shape, calib_passes: int, input_kind: str = "randn"):
    """The model every command starts from: ``weights`` loaded when given, else the original's seeded init
    with its BN statistics calibrated on the seeded image of ``seed + 1`` (``calib_passes`` 0: left fresh)."""
    import torch
    model = build(cfg, seed)
    if weights:
        load_weights(model, weights)
    elif calib_passes > 0:
        n, _, h, w = calib_shape
        image = torch.from_numpy(seeded_input(seed + 1, calib_shape, input_kind)[0])
        calibrate_bn(model, image, image_metas(n, h, w), calib_passes)
    return model


def seeded_input(seed: int, shape, kind: str = "randn"):
    """(float32 input, uint8 photo or None). ``randn``: ``seeded_image``. ``uint8``: the same normal draws as
    a photo around the IDRiD mean with the IDRiD spread, rounded and clipped to uint8, then normalised as
    the config's pipeline does ((raw - mean) / std in float32), so the float input follows from the photo."""
    import numpy as np
    z = seeded_image(seed, shape)
    if kind == "randn":
        return z, None
    mean = np.asarray(IDRID_MEAN, np.float32).reshape(1, 3, 1, 1)
    std = np.asarray(IDRID_STD, np.float32).reshape(1, 3, 1, 1)
    raw = np.clip(np.rint(mean + std * z), 0, 255).astype(np.uint8)
    return ((raw.astype(np.float32) - mean) / std).astype(np.float32), raw


# The IDRiD normalisation of the original's dataset config (configs/_base_/datasets/hr_idrid_2880x1920-slide.py).
IDRID_MEAN = (116.513, 56.437, 16.309)
IDRID_STD = (80.206, 41.232, 13.293)
# Gradients an io export keeps (the float64 rerun keeps them all, or up to a size).
IO_GRADIENTS = ("decode_head.conv_seg.weight", "decode_head.conv_seg.bias", "decode_head.convs.0.conv.weight",
                "backbone.conv1.weight")


def _numpy(t):
    return t.detach().cpu().numpy()


def _scale_ratio(values):
    """``--scale-ratio``: one value fixes the crop size (the HRDecoder randomises only for a pair)."""
    if values is None:
        return None
    return values[0] if len(values) == 1 else tuple(values)


# ----------------------------------------------------------------------------------------------- commands
def cmd_check(args):
    import mmcv
    import mmengine
    import numpy as np
    import torch
    model = build(load_config("hrdecoder", 4, blocks=1, modules=1, hr_scale=32), 0).eval()
    with torch.no_grad():
        out = model.encode_decode(torch.from_numpy(seeded_image(0, (1, 3, 64, 64))), image_metas(1, 64, 64))
    assert out.shape == (1, 4, 64, 64) and bool(torch.isfinite(out).all())
    print(json.dumps(dict(ok=True, commit=source_commit(), torch=torch.__version__, cuda=torch.version.cuda,
                          mmcv=mmcv.__version__, mmengine=mmengine.__version__, numpy=np.__version__,
                          params=count_params(model))))


def cmd_export(args):
    """float32 export of the HRDecoder config: ``<tag>_seed<seed>_state_dict.pth`` (the weights) and
    ``<tag>_io.npz`` (input, intermediate and final eval outputs, one training forward)."""
    import numpy as np
    import torch
    n, h, w = args.batch, args.size, args.size
    cfg = load_config("hrdecoder", args.width, blocks=args.blocks, modules=args.modules, hr_scale=args.hr_scale,
                      crop_num=args.crop_num, scale_ratio=_scale_ratio(args.scale_ratio))
    calib = 0 if args.weights else args.bn_calib
    model = fresh_model(cfg, args.seed, args.weights, (n, 3, h, w), calib, args.input_kind)
    state = model.state_dict()
    tag = args.tag or f"w{args.width}_{args.size}_hr{args.hr_scale}"
    os.makedirs(args.out, exist_ok=True)
    if not args.no_state_dict:
        weights = os.path.join(args.state_dict_dir or args.out, f"{tag}_seed{args.seed}_state_dict.pth")
        os.makedirs(os.path.dirname(weights), exist_ok=True)
        torch.save(state, weights)
        print(f"wrote {weights}")
    image_np, raw = seeded_input(args.seed, (n, 3, h, w), args.input_kind)
    image, metas = torch.from_numpy(image_np), image_metas(n, h, w)
    sr = model.scale_ratio
    meta = dict(width=args.width, size=[h, w], batch=n, hr_scale=[args.hr_scale] * 2, blocks=args.blocks,
                modules=args.modules, crop_num=args.crop_num, seed=args.seed, input_kind=args.input_kind,
                scale_ratio=list(sr) if isinstance(sr, (tuple, list)) else sr, divisible=model.divisible,
                hr_loss_weight=model.hr_loss_weight, lr_loss_weight=model.lr_loss_weight,
                num_params=count_params(model), bn_calib_passes=calib, calib_input_seed=args.seed + 1,
                init_from=os.path.basename(args.weights) if args.weights else None, torch=torch.__version__,
                config=CONFIG_FILES["hrdecoder"])
    out = dict(meta=np.array(json.dumps(meta)))
    if raw is not None:
        out.update(input_uint8=raw, norm_mean=np.asarray(IDRID_MEAN, np.float32),
                   norm_std=np.asarray(IDRID_STD, np.float32))
    if not args.compact:
        out["input"] = image_np
    # Eval: the pieces of encode_decode through the segmentor's own methods, then encode_decode itself.
    module = hrdecoder_module()
    model.eval()
    with torch.no_grad():
        lr_input = module.resize(image, model.hr_scale, mode="bilinear")
        feats = model.extract_feat(lr_input)
        lr_feat = model._transform_inputs(feats)
        lr_logits = model._decode_head_forward_test([lr_feat], metas)
        windows = model.hr_slide_inference((h, w), lr_feat, metas)
        fused = _numpy(model.encode_decode(image, metas))
    out.update({f"feat{i}": _numpy(f) for i, f in enumerate(feats)})
    out["lr_logits"] = _numpy(lr_logits)
    out["crop_boxes"] = np.asarray(windows["boxes"], np.int64)
    if args.compact:                   # large sizes: a subsampled map and one full-resolution centre patch
        s, k = args.compact_stride, args.compact_patch
        y0, x0 = h // 2 - k // 2, w // 2 - k // 2
        out.update(fused_logits_stride=np.array(s), fused_logits_sub=np.ascontiguousarray(fused[:, :, ::s, ::s]),
                   fused_patch_origin=np.array([y0, x0]),
                   fused_logits_patch=np.ascontiguousarray(fused[:, :, y0:y0 + k, x0:x0 + k]))
    else:
        out.update(lr_input=_numpy(lr_input), lr_feat=_numpy(lr_feat), crop_logits=_numpy(windows["logits"]),
                   fused_logits=fused)
    if not args.no_train:              # a fresh copy of the same weights, train mode
        tmodel = build(cfg, args.seed)
        tmodel.load_state_dict(state)
        tmodel.train()
        label = seeded_label(args.seed, (n, 1, h, w))
        out["train_label"] = label.astype(np.uint8)
        losses, total, draws = train_forward(tmodel, image, metas, torch.from_numpy(label), args.train_seed)
        total.backward()
        out.update({f"train_loss/{k}": _numpy(v) for k, v in losses.items()})
        out.update({"train_loss/total": _numpy(total), "train_np_seed": np.array(args.train_seed),
                    "train_hr_scale": np.asarray(draws["hr_scale"], np.int64),
                    "train_crop_boxes": np.asarray(draws["boxes"], np.int64)})
        params = dict(tmodel.named_parameters())
        out.update({f"train_grad/{k}": _numpy(params[k].grad) for k in IO_GRADIENTS
                    if k in params and params[k].grad is not None})
        out.update({f"train_buffer/{k}": _numpy(v) for k, v in tmodel.state_dict().items()
                    if k.startswith("decode_head.") and ("running_" in k or "num_batches" in k)})
        print("train loss", float(total), "crop draws", draws)
    path = os.path.join(args.out, f"{tag}_io.npz")
    np.savez(path, **out)
    print(f"wrote {path}")


def cmd_float64(args):
    """The weights and input of an io export through the original in float64: eval ``encode_decode``, one
    ``forward_train`` with the export's crop draws (checked), its gradients and the head's BN statistics."""
    import numpy as np
    import torch
    io = np.load(args.io)
    meta = json.loads(str(io["meta"]))
    sr = meta["scale_ratio"]
    cfg = load_config("hrdecoder", meta["width"], blocks=meta["blocks"], modules=meta["modules"],
                      hr_scale=meta["hr_scale"][0], crop_num=meta["crop_num"],
                      scale_ratio=tuple(sr) if isinstance(sr, list) else sr)
    image = torch.from_numpy(io["input"].astype(np.float64))
    n, _, h, w = image.shape
    metas = image_metas(n, h, w)
    out = {}
    model = build(cfg, meta["seed"])
    load_weights(model, args.weights)
    model = model.double().eval()
    with torch.no_grad():
        out["fused_logits"] = _numpy(model.encode_decode(image, metas))
    model = build(cfg, meta["seed"])
    load_weights(model, args.weights)
    model = model.double().train()
    with float64_losses():
        losses, total, draws = train_forward(model, image, metas,
                                             torch.from_numpy(io["train_label"].astype(np.int64)),
                                             int(io["train_np_seed"]))
        total.backward()
    if not np.array_equal(np.asarray(draws["boxes"]), io["train_crop_boxes"]):
        raise SystemExit(f"crop draws {draws['boxes']} differ from the export's {io['train_crop_boxes'].tolist()}")
    out.update({f"train_loss/{k}": _numpy(v) for k, v in losses.items()})
    out["train_loss/total"] = _numpy(total)
    out.update({f"train_buffer/{k}": _numpy(v) for k, v in model.state_dict().items()
                if k.startswith("decode_head.") and "running_" in k})
    out.update({f"train_grad/{k}": _numpy(p.grad) for k, p in model.named_parameters()
                if p.grad is not None and (args.grad_max_size is None or p.numel() <= args.grad_max_size
                                           or k.startswith("decode_head."))})
    np.savez(args.out, **out)
    print(f"wrote {args.out}: loss {float(total):.12f}, "
          f"{sum(k.startswith('train_grad/') for k in out)} gradients")


def cmd_state_npz(args):
    """A ``.pth`` state_dict as an ``.npz`` of NumPy arrays, same keys and order (for readers without torch)."""
    import numpy as np
    import torch
    state = torch.load(args.weights, map_location="cpu")
    np.savez(args.out, **{k: _numpy(v) for k, v in state.items()})
    print(f"wrote {args.out} ({len(state)} tensors)")


def cmd_metrics(args):
    """The original's lesion metrics (its ``lesion_metric.py``: sigmoid outputs, 11 thresholds for AUPR) of
    the ``probs_<i>`` / ``label_<i>`` maps of ``--maps``; writes those maps and ``meta`` with ``ref_<metric>``
    (5 entries, entry 0 background) to ``--out``."""
    import numpy as np
    from mmseg.core import lesion_metrics
    data = np.load(args.maps)
    count = sum(k.startswith("probs_") for k in data.files)
    probs = [data[f"probs_{i}"] for i in range(count)]
    labels = [data[f"label_{i}"] for i in range(count)]
    # A result is (probabilities, use_sigmoid, compute_aupr), as the original's test loop hands them over.
    values = lesion_metrics([(p, True, True) for p in probs], labels, len(probs[0]) + 1)
    out = {k: data[k] for k in data.files if k.startswith(("probs_", "label_"))}
    out.update({f"ref_{name}": np.asarray(v, np.float64)
                for name, v in zip(("IoU", "F1", "PPV", "S", "AUPR", "MAE"), values)})
    if "meta" in data.files:
        out["meta"] = data["meta"]
    np.savez(args.out, **out)
    print(f"wrote {args.out}: " + json.dumps({k: np.asarray(v).tolist() for k, v in out.items()
                                                if k.startswith("ref_")}))


def _loadavg():
    try:
        return os.getloadavg()
    except OSError:
        return None


def _timed(fn, warmup: int, runs: int):
    import statistics
    import time
    for _ in range(warmup):
        fn()
    walls, cpus = [], []
    for _ in range(runs):
        c0, t0 = time.process_time(), time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
        cpus.append(time.process_time() - c0)
    return dict(median_s=round(statistics.median(walls), 4), min_s=round(min(walls), 4),
                median_cpu_s=round(statistics.median(cpus), 4), runs=[round(t, 4) for t in walls],
                loadavg=_loadavg())


def cmd_time(args):
    """Time eval ``encode_decode`` (no grad) and/or one training step (``forward_train``, backward, the
    config's SGD step); one JSON line each, ``what`` = ``infer`` / ``train_step``."""
    import numpy as np
    import torch
    from mmcv.runner import build_optimizer
    n, h, w = args.batch, args.size, args.size
    cfg = load_config("hrdecoder", args.width, blocks=args.blocks, modules=args.modules, hr_scale=args.hr_scale,
                      crop_num=args.crop_num, scale_ratio=_scale_ratio(args.scale_ratio))
    model = fresh_model(cfg, args.seed, args.weights, (n, 3, h, w), 0)
    image, metas = torch.from_numpy(seeded_image(args.seed, (n, 3, h, w))), image_metas(n, h, w)
    common = dict(width=args.width, size=[h, w], batch=n, hr_scale=[args.hr_scale] * 2, crop_num=args.crop_num,
                  threads=torch.get_num_threads(), torch=torch.__version__)
    if args.what in ("infer", "both"):
        model.eval()

        def infer():
            with torch.no_grad():
                model.encode_decode(image, metas)
        print(json.dumps(dict(what="infer", **_timed(infer, args.warmup, args.runs), **common)), flush=True)
    if args.what in ("train", "both"):
        model.train()
        optimizer = build_optimizer(model, cfg.optimizer)
        label = torch.from_numpy(seeded_label(args.seed, (n, 1, h, w)))
        np.random.seed(args.train_seed)

        def step():
            optimizer.zero_grad()
            total, _ = model._parse_losses(model.forward_train(image, metas, label))
            total.backward()
            optimizer.step()
        print(json.dumps(dict(what="train_step", **_timed(step, args.warmup, args.runs), **common)), flush=True)


def _model_flags(p, time_defaults: bool = False):
    p.add_argument("--width", type=int, default=18, help="HRNet width (18, 48, or any: branches width * 2^i)")
    p.add_argument("--size", type=int, default=512, help="square input, H = W")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--blocks", type=int, default=None, help="residual blocks per branch, every stage "
                   "(default: the config's)")
    p.add_argument("--modules", type=int, default=None, help="HRNet modules per stage (default: the config's)")
    p.add_argument("--hr-scale", type=int, default=256)
    p.add_argument("--crop-num", type=int, default=2)
    p.add_argument("--scale-ratio", type=float, nargs="+", default=None,
                   help="HR crop scale ratio (config: 0.75 1.25); one value: fixed crop size")
    p.add_argument("--seed", type=int, default=0, help="init, calibration (seed + 1) and input seed")
    p.add_argument("--train-seed", type=int, default=0, help="numpy / torch seed right before forward_train")
    p.add_argument("--weights", default=None, help="start from this state_dict (.pth or .npz, mmseg names) "
                   "instead of the seeded init")


def build_parser():
    import argparse
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--original", default=None, help=f"the folder setup_original.sh made (default: ${ENV}, "
                   "else <temp dir>/hrdecoder-original)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("check", help="import the original, build a small HRDecoder, run it once")
    e = sub.add_parser("export", help="float32 export: <tag>_seed<seed>_state_dict.pth and <tag>_io.npz")
    _model_flags(e)
    e.add_argument("--tag", default=None, help="file name prefix (default w<width>_<size>_hr<hr-scale>)")
    e.add_argument("--out", required=True, help="folder for the files")
    e.add_argument("--state-dict-dir", default=None, help="folder for the .pth (default: --out)")
    e.add_argument("--no-state-dict", action="store_true")
    e.add_argument("--input-kind", choices=["randn", "uint8"], default="randn",
                   help="uint8: a seeded photo normalised with the IDRiD mean / std (stored too)")
    e.add_argument("--bn-calib", type=int, default=1, help="BN calibration passes (0: fresh statistics)")
    e.add_argument("--compact", action="store_true", help="large sizes: no input / lr_feat / crop logits; the "
                   "fused logits subsampled plus one full-resolution centre patch")
    e.add_argument("--compact-stride", type=int, default=4)
    e.add_argument("--compact-patch", type=int, default=384)
    e.add_argument("--no-train", action="store_true", help="skip the training forward")
    f = sub.add_parser("float64", help="rerun an io export in float64")
    f.add_argument("io", help="<tag>_io.npz of an export")
    f.add_argument("weights", help="its state_dict (.pth or .npz)")
    f.add_argument("out", help="the float64 .npz to write")
    f.add_argument("--grad-max-size", type=int, default=None, help="keep only the gradients of parameters of "
                   "at most this many elements, plus the whole decode head (default: all)")
    s = sub.add_parser("state-npz", help="a .pth state_dict as .npz arrays, same keys")
    s.add_argument("weights")
    s.add_argument("out")
    m = sub.add_parser("metrics", help="the original's lesion metrics of stored probability / label maps")
    m.add_argument("maps", help=".npz with probs_<i> (C, H, W) and label_<i> (H, W)")
    m.add_argument("out")
    t = sub.add_parser("time", help="time eval encode_decode and / or a training step; JSON lines")
    _model_flags(t)
    t.add_argument("--what", choices=["infer", "train", "both"], default="both")
    t.add_argument("--warmup", type=int, default=1)
    t.add_argument("--runs", type=int, default=3)
    return p


COMMANDS = {"check": cmd_check, "export": cmd_export, "float64": cmd_float64, "state-npz": cmd_state_npz,
            "metrics": cmd_metrics, "time": cmd_time}


def main(argv=None):
    args = build_parser().parse_args(argv)
    activate(args.original)
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    COMMANDS[args.command](args)


if __name__ == "__main__":
    main()
