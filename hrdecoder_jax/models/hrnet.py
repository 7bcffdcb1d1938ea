"""HRNetV2 backbone (Wang et al.), configured like mmseg's ``HRNet(extra=...)``.

``extra`` holds ``stage1`` .. ``stage4``, each with ``num_modules``, ``num_branches``, ``block``
(``'BOTTLENECK'`` or ``'BASIC'``), ``num_blocks`` and ``num_channels``; W18, W32, W48 and shallow test
variants differ only there. Attribute names follow the mmseg state_dict (``conv1``, ``bn1``, ``layer1``,
``transition1``, ``stage2.0.branches.0.0.conv1``, ``stage2.0.fuse_layers.1.0.0.0`` ...), so weight import is
a mechanical rename. Input ``[B, H, W, 3]``; output the 4 branches at strides 4, 8, 16 and 32.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax
from flax import nnx

from hrdecoder_jax.models.layers import BatchNorm, apply_conv_bn, conv, conv_bn, conv_bn_forward
from hrdecoder_jax.models.resize import resize_bilinear
from hrdecoder_jax.ops.fence import fence

Array = jax.Array


class BasicBlock(nnx.Module):
    expansion = 1

    def __init__(self, in_channels: int, planes: int, *, stride: int = 1, downsample: bool = False,
                 dtype=None, rngs: nnx.Rngs):
        self.conv1 = conv(in_channels, planes, 3, stride=stride, dtype=dtype, rngs=rngs)
        self.bn1 = BatchNorm(planes, dtype=dtype)
        self.conv2 = conv(planes, planes, 3, dtype=dtype, rngs=rngs)
        self.bn2 = BatchNorm(planes, dtype=dtype)
        self.downsample = (conv_bn(in_channels, planes, 1, stride=stride, dtype=dtype, rngs=rngs)
                           if downsample else None)

    def __call__(self, x: Array) -> Array:
        out = jax.nn.relu(conv_bn_forward(self.conv1, self.bn1, x))
        out = conv_bn_forward(self.conv2, self.bn2, out)
        identity = apply_conv_bn(self.downsample, x, relu=False) if self.downsample is not None else x
        return fusion_fence(jax.nn.relu(out + identity))


class Bottleneck(nnx.Module):
    """mmseg/PyTorch-style bottleneck: the stride sits on the 3x3 conv."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, *, stride: int = 1, downsample: bool = False,
                 dtype=None, rngs: nnx.Rngs):
        out_channels = planes * self.expansion
        self.conv1 = conv(in_channels, planes, 1, dtype=dtype, rngs=rngs)
        self.bn1 = BatchNorm(planes, dtype=dtype)
        self.conv2 = conv(planes, planes, 3, stride=stride, dtype=dtype, rngs=rngs)
        self.bn2 = BatchNorm(planes, dtype=dtype)
        self.conv3 = conv(planes, out_channels, 1, dtype=dtype, rngs=rngs)
        self.bn3 = BatchNorm(out_channels, dtype=dtype)
        self.downsample = (conv_bn(in_channels, out_channels, 1, stride=stride, dtype=dtype, rngs=rngs)
                           if downsample else None)

    def __call__(self, x: Array) -> Array:
        out = jax.nn.relu(conv_bn_forward(self.conv1, self.bn1, x))
        out = jax.nn.relu(conv_bn_forward(self.conv2, self.bn2, out))
        out = conv_bn_forward(self.conv3, self.bn3, out)
        identity = apply_conv_bn(self.downsample, x, relu=False) if self.downsample is not None else x
        return fusion_fence(jax.nn.relu(out + identity))


def fusion_fence(x: Array) -> Array:
    """``x``, computed once into memory (on CPUs; the identity elsewhere): XLA's CPU fusion copies a cheap
    elementwise producer into every consumer, so along a residual chain each block recomputed, and re-read
    the inputs of, every block before it (2772 ``maximum`` ops for the ~300 ReLUs of the W18 forward, 30% of
    its time and 60% of the train step's compile time). See ``ops/fence.py``."""
    return fence(x)


BLOCKS = {"BASIC": BasicBlock, "BOTTLENECK": Bottleneck}


def make_blocks(block, in_channels: int, planes: int, num_blocks: int, *, dtype, rngs) -> nnx.List:
    """A branch / ``layer1``: the first block projects the identity when the channel count changes."""
    out_channels = planes * block.expansion
    layers = [block(in_channels, planes, downsample=in_channels != out_channels, dtype=dtype, rngs=rngs)]
    layers += [block(out_channels, planes, dtype=dtype, rngs=rngs) for _ in range(1, num_blocks)]
    return nnx.List(layers)


class HRModule(nnx.Module):
    """Parallel branches followed by the exchange (fuse) units: output i = ReLU(sum_j f_ij(x_j))."""

    def __init__(self, block, in_channels: Sequence[int], num_blocks: Sequence[int],
                 num_channels: Sequence[int], *, multiscale_output: bool = True, dtype=None, rngs: nnx.Rngs):
        self.num_branches = len(num_channels)
        self.multiscale_output = multiscale_output
        self.branches = nnx.List([
            make_blocks(block, in_channels[i], num_channels[i], num_blocks[i], dtype=dtype, rngs=rngs)
            for i in range(self.num_branches)])
        channels = [c * block.expansion for c in num_channels]
        self.out_channels = channels
        if self.num_branches == 1:
            self.fuse_layers = None
            return
        fuse_layers = []
        for i in range(self.num_branches if multiscale_output else 1):
            row = []
            for j in range(self.num_branches):
                if j > i:    # 1x1 conv + BN, then upsample (parameter-free)
                    row.append(conv_bn(channels[j], channels[i], 1, dtype=dtype, rngs=rngs))
                elif j == i:
                    row.append(None)
                else:        # (i - j) stride-2 3x3 convs; only the last changes the channel count
                    downs = [conv_bn(channels[j], channels[i] if k == i - j - 1 else channels[j], 3, stride=2,
                                     dtype=dtype, rngs=rngs) for k in range(i - j)]
                    row.append(nnx.List(downs))
            fuse_layers.append(nnx.List(row))
        self.fuse_layers = nnx.List(fuse_layers)

    def __call__(self, xs: list[Array]) -> list[Array]:
        xs = [self._run_branch(b, x) for b, x in zip(self.branches, xs)]
        if self.fuse_layers is None:
            return xs
        outs = []
        for i, row in enumerate(self.fuse_layers):
            y = None
            for j, layer in enumerate(row):
                if j == i:
                    z = xs[j]
                elif j > i:
                    z = resize_bilinear(apply_conv_bn(layer, xs[j], relu=False), xs[i].shape[1:3])
                else:
                    z = xs[j]
                    for k, down in enumerate(layer):
                        z = apply_conv_bn(down, z, relu=k < len(layer) - 1)
                y = z if y is None else y + z
            outs.append(fusion_fence(jax.nn.relu(y)))
        return outs

    @staticmethod
    def _run_branch(blocks, x):
        for blk in blocks:
            x = blk(x)
        return x


def _stage_setting(extra: Mapping[str, Any], name: str) -> dict:
    try:
        cfg = dict(extra[name])
    except KeyError:
        raise KeyError(f"backbone.extra.{name} is missing") from None
    for key in ("num_modules", "num_branches", "block", "num_blocks", "num_channels"):
        if key not in cfg:
            raise KeyError(f"backbone.extra.{name}.{key} is missing")
    if cfg["block"] not in BLOCKS:
        raise ValueError(f"backbone.extra.{name}.block must be one of {sorted(BLOCKS)}, got {cfg['block']!r}")
    nb = cfg["num_branches"]
    if len(cfg["num_blocks"]) != nb or len(cfg["num_channels"]) != nb:
        raise ValueError(f"backbone.extra.{name}: num_blocks and num_channels need num_branches={nb} entries")
    return cfg


class HRNet(nnx.Module):
    """HRNetV2 backbone. ``__call__([B, H, W, 3]) -> [x4, x8, x16, x32]`` (NHWC, strides 4/8/16/32)."""

    def __init__(self, extra: Mapping[str, Any], *, in_channels: int = 3, dtype=None, rngs: nnx.Rngs):
        self.conv1 = conv(in_channels, 64, 3, stride=2, dtype=dtype, rngs=rngs)
        self.bn1 = BatchNorm(64, dtype=dtype)
        self.conv2 = conv(64, 64, 3, stride=2, dtype=dtype, rngs=rngs)
        self.bn2 = BatchNorm(64, dtype=dtype)

        s1 = _stage_setting(extra, "stage1")
        block = BLOCKS[s1["block"]]
        self.layer1 = make_blocks(block, 64, s1["num_channels"][0], s1["num_blocks"][0], dtype=dtype, rngs=rngs)
        pre_channels = [s1["num_channels"][0] * block.expansion]

        for stage in (2, 3, 4):
            cfg = _stage_setting(extra, f"stage{stage}")
            block = BLOCKS[cfg["block"]]
            channels = [c * block.expansion for c in cfg["num_channels"]]
            setattr(self, f"transition{stage - 1}", self._make_transition(pre_channels, channels, dtype, rngs))
            modules, in_ch = [], list(channels)
            for m in range(cfg["num_modules"]):
                hr_module = HRModule(block, in_ch, cfg["num_blocks"], cfg["num_channels"],
                                     multiscale_output=True, dtype=dtype, rngs=rngs)
                in_ch = hr_module.out_channels
                modules.append(hr_module)
            setattr(self, f"stage{stage}", nnx.List(modules))
            pre_channels = in_ch
        self.out_channels = tuple(pre_channels)

    @staticmethod
    def _make_transition(pre: Sequence[int], cur: Sequence[int], dtype, rngs) -> nnx.List:
        layers = []
        for i, c in enumerate(cur):
            if i < len(pre):
                layers.append(conv_bn(pre[i], c, 3, dtype=dtype, rngs=rngs) if pre[i] != c else None)
            else:  # a new, lower-resolution branch grown from the last branch by stride-2 convs
                downs = []
                for j in range(i + 1 - len(pre)):
                    out = c if j == i - len(pre) else pre[-1]
                    downs.append(conv_bn(pre[-1], out, 3, stride=2, dtype=dtype, rngs=rngs))
                layers.append(nnx.List(downs))
        return nnx.List(layers)

    @staticmethod
    def _apply_transition(layer, x: Array, new_branch: bool) -> Array:
        if layer is None:
            return x
        if not new_branch:
            return apply_conv_bn(layer, x, relu=True)
        for down in layer:
            x = apply_conv_bn(down, x, relu=True)
        return x

    def __call__(self, x: Array) -> list[Array]:
        x = jax.nn.relu(conv_bn_forward(self.conv1, self.bn1, x))
        x = jax.nn.relu(conv_bn_forward(self.conv2, self.bn2, x))
        for blk in self.layer1:
            x = blk(x)
        ys = [x]
        for stage in (2, 3, 4):
            transition = getattr(self, f"transition{stage - 1}")
            # Existing branches pass through (or change width); new ones grow from the last branch.
            xs = [self._apply_transition(t, ys[i] if i < len(ys) else ys[-1], new_branch=i >= len(ys))
                  for i, t in enumerate(transition)]
            for module in getattr(self, f"stage{stage}"):
                xs = module(xs)
            ys = xs
        return ys
