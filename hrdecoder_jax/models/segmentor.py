"""Segmentors: HRDecoder, Efficient-HRDecoder and the plain FCN baseline (mmseg ``EncoderDecoder``).

HRDecoder (``mmseg/models/segmentors/HRDecoder.py`` of the reference), for an image ``[B, H, W, 3]``:

1. LR path: resize the image to ``hr_scale``, run HRNet, upsample the 4 branches to stride 4 and
   concatenate them in branch order -> ``lr_feat [B, f_h, f_w, C]``; the head gives ``lr_logit``.
2. HR representation learning (training only): ``crop_num`` random boxes of one size ``s`` (the
   ``hr_scale`` scaled by a ratio from ``scale_ratio``, a multiple of ``divisible``); each box is mapped to
   the feature grid, its feature crop resized to the full ``f_h x f_w`` and decoded by the *shared* head; the
   dice loss against the ``s x s`` label crop, times ``hr_loss_weight``, is ``hr``.
3. HR fusion: ``hr_scale`` windows tile the image (the reference's slide rule with stride = window); each
   window's feature crop is decoded the same way and resized to the window; the fused logit is
   ``(HR + up_LR) / 2`` inside every window (later windows overwrite earlier ones, the LR term is always the
   unfused upsampled LR logit). Its dice loss is ``fuse``; ``lr`` (dice of ``lr_logit``) is added when
   ``lr_loss_weight > 0``. ``total`` sums them, as mmseg's ``_parse_losses``.

The head runs three times in training (LR, HR crops, windows), each with its own batch statistics, in that
order, so the running statistics match the reference. Crops and windows are cut from the head's 1x1
``compress`` projection of ``lr_feat`` rather than from ``lr_feat`` itself (``project``): the same numbers,
since a bias-free 1x1 conv commutes with bilinear resizing, at ``channels``/``C`` of the memory. The HR
crop size and offsets are traced values: every draw runs through one compiled function (see
``resize.crop_resize_bilinear``).
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from hrdecoder_jax import config_utils
from hrdecoder_jax.config_utils import ConfigError
from hrdecoder_jax.losses import dice_loss
from hrdecoder_jax.models.head import FCNHead
from hrdecoder_jax.models.hrnet import HRNet
from hrdecoder_jax.models.layers import ConvModule
from hrdecoder_jax.models.resize import crop_resize_bilinear, resize_bilinear, upsample_to_box

Array = jax.Array


def _pair(v) -> tuple[int, int]:
    if isinstance(v, (int, np.integer)):
        return int(v), int(v)
    a, b = v
    return int(a), int(b)


def slide_windows(image_size: Sequence[int], window: Sequence[int], stride: Sequence[int]) -> list[tuple]:
    """The reference's sliding-window boxes ``(y1, y2, x1, x2)``, row-major, last windows shifted inward."""
    (h, w), (wh, ww), (sh, sw) = image_size, window, stride
    h_grids = max(h - wh + sh - 1, 0) // sh + 1
    w_grids = max(w - ww + sw - 1, 0) // sw + 1
    boxes = []
    for i in range(h_grids):
        for j in range(w_grids):
            y1, x1 = i * sh, j * sw
            y2, x2 = min(y1 + wh, h), min(x1 + ww, w)
            boxes.append((max(y2 - wh, 0), y2, max(x2 - ww, 0), x2))
    return boxes


def upsample_concat(features: Sequence[Array]) -> Array:
    """Resize every branch to the first branch's size and concatenate on channels, in branch order."""
    size = features[0].shape[1:3]
    return jnp.concatenate([resize_bilinear(f, size) for f in features], axis=-1)


def _dtype(model_cfg) -> Any:
    return jnp.dtype(_required(model_cfg, "model", ("dtype",))[0] or "float32")


def _as_input(images: Array, dtype) -> Array:
    """Images in the precision the model resizes them in: a float64 model takes float64 images (the LR
    resize then runs in float64, as PyTorch's on float64 tensors); bfloat16 and float32 models resize the
    float32 images in float32."""
    return images.astype(jnp.promote_types(images.dtype, dtype))


def _required(section: Mapping[str, Any], name: str, keys: Sequence[str]) -> list:
    """The values of ``keys`` in the config section ``name``. The config builders of
    ``config_utils`` are the one source of every default; a missing key is an error, never a silent
    fallback to some other default (mmseg's class defaults differ from the paper's)."""
    missing = [k for k in keys if k not in section]
    if missing:
        raise ConfigError(f"{name} lacks {', '.join(missing)} (build model configs with "
                          "hrdecoder_jax.config_utils.model_config)")
    return [section[k] for k in keys]


def _build_head(model_cfg, dtype, rngs) -> FCNHead:
    (in_channels, channels, num_classes, kernel_size, num_convs, compress, concat_input,
     dropout_ratio) = _required(model_cfg["decode_head"], "model.decode_head", (
        "in_channels", "channels", "num_classes", "kernel_size", "num_convs", "compress", "concat_input",
        "dropout_ratio"))
    return FCNHead(in_channels=in_channels, channels=channels, num_classes=num_classes,
                   kernel_size=kernel_size, num_convs=num_convs, compress=compress,
                   concat_input=concat_input, dropout_ratio=dropout_ratio, dtype=dtype, rngs=rngs)


def _smooth(model_cfg) -> float:
    return float(_required(model_cfg["decode_head"], "model.decode_head", ("loss_smooth",))[0])


class FCNSegmentor(nnx.Module):
    """The paper's LR/HR baselines: HRNet -> upsample+concat -> FCN head -> resize to the image."""

    def __init__(self, model_cfg: Mapping[str, Any], *, rngs: nnx.Rngs):
        dtype = _dtype(model_cfg)
        self.dtype = dtype
        self.backbone = HRNet(model_cfg["backbone"]["extra"], dtype=dtype, rngs=rngs)
        self.decode_head = _build_head(model_cfg, dtype, rngs)
        self.smooth = _smooth(model_cfg)

    def _logits(self, images: Array) -> Array:
        logits = self.decode_head(upsample_concat(self.backbone(_as_input(images, self.dtype))))
        return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))

    def __call__(self, images: Array) -> Array:
        """``[B, H, W, 3]`` normalised images -> logits ``[B, H, W, num_classes]``."""
        return resize_bilinear(self._logits(images), images.shape[1:3])

    def train_losses(self, images: Array, labels: Array, *, crop_boxes=None, key=None) -> dict[str, Array]:
        del crop_boxes, key  # no random crops in the baseline; same signature as HRDecoder
        logits = resize_bilinear(self._logits(images), labels.shape[1:3])
        seg = dice_loss(logits, labels, smooth=self.smooth)
        return {"seg": seg, "total": seg}


class HRDecoder(nnx.Module):
    """HRDecoder segmentor (see module docstring). ``Efficient`` variant: ``visual_dim`` is set."""

    def __init__(self, model_cfg: Mapping[str, Any], *, rngs: nnx.Rngs):
        dtype = _dtype(model_cfg)
        self.dtype = dtype
        hr = model_cfg["hr_settings"]
        self.backbone = HRNet(model_cfg["backbone"]["extra"], dtype=dtype, rngs=rngs)
        (hr_scale, ratio, divisible, crop_num, hr_loss_weight, lr_loss_weight, visual_dim) = _required(
            hr, "model.hr_settings", ("hr_scale", "scale_ratio", "divisible", "crop_num", "hr_loss_weight",
                                      "lr_loss_weight", "visual_dim"))
        if visual_dim:
            # Efficient-HRDecoder: a 1x1 ConvModule compresses the concatenated features.
            self.multiscale_compressor = ConvModule(sum(self.backbone.out_channels), int(visual_dim), 1,
                                                    dtype=dtype, rngs=rngs)
        else:
            self.multiscale_compressor = None
        self.decode_head = _build_head(model_cfg, dtype, rngs)
        self.num_classes = self.decode_head.num_classes
        self.hr_scale = _pair(hr_scale)
        self.scale_ratio = tuple(float(r) for r in ratio) if isinstance(ratio, (tuple, list)) else None
        self.divisible = int(divisible)
        self.crop_num = int(crop_num)
        self.hr_loss_weight = float(hr_loss_weight)
        self.lr_loss_weight = float(lr_loss_weight)
        self.smooth = _smooth(model_cfg)

    # ------------------------------------------------------------------------------------------------
    # Shapes
    # ------------------------------------------------------------------------------------------------
    @property
    def feature_size(self) -> tuple[int, int]:
        """``lr_feat`` spatial size: HRNet's stride-4 branch of the ``hr_scale`` image."""
        return config_utils.feature_size(self.hr_scale)

    def grid(self, image_size: Sequence[int]) -> tuple[int, int]:
        """Image pixels per feature cell; the reference floors ``image // feature``."""
        fh, fw = self.feature_size
        return image_size[0] // fh, image_size[1] // fw

    @property
    def max_crop_size(self) -> tuple[int, int]:
        """Largest HR crop side a random draw can give (a fixed canvas for the traced crop)."""
        return config_utils.max_hr_crop(self.hr_scale, self.scale_ratio, self.divisible)

    # ------------------------------------------------------------------------------------------------
    # Forward pieces
    # ------------------------------------------------------------------------------------------------
    def extract_lr_features(self, images: Array) -> Array:
        """``[B, H, W, 3]`` -> ``lr_feat [B, f_h, f_w, C]`` from the image resized to ``hr_scale``."""
        lr_images = resize_bilinear(_as_input(images, self.dtype), self.hr_scale)
        feat = upsample_concat(self.backbone(lr_images))
        if self.multiscale_compressor is not None:
            feat = self.multiscale_compressor(feat)
        return feat

    def project(self, lr_feat: Array) -> Array:
        """The head's linear stem applied once to ``lr_feat`` (identity when the head has none).

        The reference resizes 720-channel feature crops and then applies the head, whose first layer is a
        bias-free 1x1 conv; that conv commutes with bilinear resizing, so cutting the crops and windows from
        the projected map is the same model with crops ``channels`` wide instead of 720 (11x less memory and
        work on the HR paths of the IDRiD config). BN and ReLU still run on the resized maps."""
        return self.decode_head.project(lr_feat)

    def _decode(self, proj: Array) -> Array:
        """Head on a projected map (from ``project``, possibly cropped and resized) -> float32 logits."""
        logits = self.decode_head.from_projected(proj)
        return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))

    def window_logits(self, proj: Array, image_size: Sequence[int]) -> tuple[Array, list[tuple]]:
        """Decode every ``hr_scale`` window of the projected map ``proj = project(lr_feat)``:
        ``[n_windows, B, hr_h, hr_w, K]`` logits and the boxes. The windows are static: plain slices."""
        boxes = slide_windows(image_size, self.hr_scale, self.hr_scale)
        gh, gw = self.grid(image_size)
        fsize = proj.shape[1:3]
        crops = [resize_bilinear(proj[:, y1 // gh:y2 // gh, x1 // gw:x2 // gw], fsize) for (y1, y2, x1, x2) in boxes]
        logits = self._decode(jnp.concatenate(crops, axis=0))       # one head call, window-major
        logits = resize_bilinear(logits, self.hr_scale)
        return logits.reshape(len(boxes), proj.shape[0], *logits.shape[1:]), boxes

    @staticmethod
    def fuse(up_lr_logit: Array, window_logits: Array, boxes: Sequence[tuple]) -> Array:
        """Average the HR window logits with the upsampled LR logits inside each window, as the reference
        (later windows overwrite earlier ones; the LR term is always the unfused upsampled LR logit)."""
        fused = up_lr_logit
        for logit, (y1, y2, x1, x2) in zip(window_logits, boxes):
            lr = jax.lax.slice_in_dim(jax.lax.slice_in_dim(up_lr_logit, y1, y2, axis=1), x1, x2, axis=2)
            fused = jax.lax.dynamic_update_slice(fused, (logit + lr) / 2, (0, y1, x1, 0))
        return fused

    def predict_parts(self, images: Array) -> dict[str, Any]:
        """Everything ``encode_decode`` computes, for inspection: ``lr_logits`` (upsampled to the image),
        ``window_logits [n, B, hr_h, hr_w, K]``, ``window_boxes`` and the ``fused`` logits ``[B, H, W, K]``."""
        size = images.shape[1:3]
        proj = self.project(self.extract_lr_features(images))
        up_lr = resize_bilinear(self._decode(proj), size)
        windows, boxes = self.window_logits(proj, size)
        return {"lr_logits": up_lr, "window_logits": windows, "window_boxes": boxes,
                "fused": self.fuse(up_lr, windows, boxes)}

    def __call__(self, images: Array) -> Array:
        """The reference ``encode_decode``: ``[B, H, W, 3]`` normalised images -> fused logits ``[B, H, W, K]``."""
        return self.predict_parts(images)["fused"]

    # ------------------------------------------------------------------------------------------------
    # Training
    # ------------------------------------------------------------------------------------------------
    def sample_crop_boxes(self, key: Array, image_size: Sequence[int]) -> Array:
        """Draw ``[crop_num, 4]`` boxes ``[y1, y2, x1, x2]`` in-graph from a PRNG key (reference rule)."""
        d = self.divisible
        k_ratio, k_off = jax.random.split(key)
        if self.scale_ratio is None:
            size = jnp.array(self.hr_scale, jnp.int32)
        else:
            lo, hi = self.scale_ratio
            r = jax.random.uniform(k_ratio, (), jnp.float32, lo, hi)
            size = (jnp.floor(jnp.array(self.hr_scale, jnp.float32) * r / d) * d).astype(jnp.int32)
            size = jnp.minimum(size, jnp.array(self.max_crop_size, jnp.int32))
        img = jnp.array(image_size, jnp.int32)
        n_off = jnp.maximum((jnp.maximum(img - size, 0) + 1) // d, 1)          # exclusive bound, per axis
        u = jax.random.uniform(k_off, (self.crop_num, 2))
        offsets = jnp.minimum(jnp.floor(u * n_off).astype(jnp.int32), n_off - 1) * d
        return jnp.stack([offsets[:, 0], offsets[:, 0] + size[0], offsets[:, 1], offsets[:, 1] + size[1]], -1)

    def hr_crop_loss(self, proj: Array, labels: Array, crop_boxes: Array) -> Array:
        """Dice loss of the head on ``crop_num`` crops of the projected map ``proj = project(lr_feat)``
        against their label crops (unweighted)."""
        image_size = labels.shape[1:3]
        gh, gw = self.grid(image_size)
        crop_boxes = jnp.asarray(crop_boxes, jnp.int32)
        feat_boxes = crop_boxes // jnp.array([gh, gh, gw, gw], jnp.int32)
        fsize = proj.shape[1:3]
        hr_feats = jax.vmap(lambda b: crop_resize_bilinear(proj, b, fsize))(feat_boxes)      # [M, B, ...]
        hr_feats = hr_feats.reshape(-1, *hr_feats.shape[2:])                              # crop-major
        hr_logits = self._decode(hr_feats)
        crop_size = jnp.stack([crop_boxes[0, 1] - crop_boxes[0, 0], crop_boxes[0, 3] - crop_boxes[0, 2]])
        canvas = self.max_crop_size
        hr_logits, mask = upsample_to_box(hr_logits, crop_size, canvas)

        # The label crops: canvas-sized windows at the traced offsets (padding keeps every window inside the
        # array, so no offset is clamped); pixels past the crop size are outside the mask.
        pad = [(0, 0), (0, canvas[0]), (0, canvas[1])] + [(0, 0)] * (labels.ndim - 3)
        padded = jnp.pad(labels, pad)

        def label_crop(box):
            zero = jnp.zeros((), box.dtype)
            start = (zero, box[0], box[2]) + (zero,) * (labels.ndim - 3)
            return jax.lax.dynamic_slice(padded, start, (labels.shape[0], *canvas, *labels.shape[3:]))

        # A Python loop, not vmap: a batched dynamic_slice would become a gather.
        hr_labels = jnp.stack([label_crop(crop_boxes[m]) for m in range(crop_boxes.shape[0])])
        hr_labels = hr_labels.reshape(-1, *hr_labels.shape[2:])
        return dice_loss(hr_logits, hr_labels, smooth=self.smooth, mask=mask)

    def train_losses(self, images: Array, labels: Array, *, crop_boxes: Array | None = None,
                     key: Array | None = None) -> dict[str, Array]:
        """Loss terms of one training forward, as the reference ``forward_train`` computes them.

        ``images [B, H, W, 3]``, ``labels [B, H, W]`` integer (0 background, 1..4 EX, HE, SE, MA) or
        multi-label ``[B, H, W, 4]``; ``crop_boxes [crop_num, 4]`` ``[y1, y2, x1, x2]`` in image pixels, all of
        one size (at most ``max_crop_size``), drawn from ``key`` when not given.
        Returns ``{'hr', 'fuse', 'total'}`` (+ ``'lr'`` when ``lr_loss_weight > 0``); ``hr`` is already weighted.
        """
        size = labels.shape[1:3]
        if crop_boxes is None:
            if key is None:
                raise ValueError("train_losses needs crop_boxes or a PRNG key to draw them")
            crop_boxes = self.sample_crop_boxes(key, size)
        proj = self.project(self.extract_lr_features(images))
        lr_logit = self._decode(proj)                                     # head call 1
        losses = {}
        if self.lr_loss_weight > 0:
            losses["lr"] = self.lr_loss_weight * dice_loss(resize_bilinear(lr_logit, size), labels,
                                                           smooth=self.smooth)
        losses["hr"] = self.hr_loss_weight * self.hr_crop_loss(proj, labels, crop_boxes)   # head call 2
        up_lr = resize_bilinear(lr_logit, size)
        windows, boxes = self.window_logits(proj, size)                   # head call 3
        losses["fuse"] = dice_loss(self.fuse(up_lr, windows, boxes), labels, smooth=self.smooth)
        losses["total"] = sum(losses.values())
        return losses
