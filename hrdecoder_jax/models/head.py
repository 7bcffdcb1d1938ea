"""The FCN decode head of the paper configs (mmseg ``FCNHead`` with the HRDecoder ``compress`` option).

``convs``: with ``compress`` a 1x1 ConvModule ``in -> channels`` then a k x k one ``channels -> channels``;
without, one k x k ``in -> channels``; then ``num_convs - 1`` more k x k ones. Optional ``conv_cat`` on
``concat([input, convs(input)])``, optional dropout, and ``conv_seg``: a 1x1 conv with bias to
``num_classes`` logits (one independent sigmoid per lesion; no background channel).
Input ``[B, h, w, in_channels]``; output logits ``[B, h, w, num_classes]`` at the input resolution.
"""
from __future__ import annotations

import jax
from flax import nnx

from hrdecoder_jax.models.layers import ConvModule, _host_normal_init, conv

Array = jax.Array


class FCNHead(nnx.Module):
    def __init__(self, *, in_channels: int, channels: int, num_classes: int = 4, kernel_size: int = 3,
                 num_convs: int = 2, compress: bool = False, concat_input: bool = True,
                 dropout_ratio: float = 0.1, dtype=None, rngs: nnx.Rngs):
        if num_convs < 0:
            raise ValueError(f"decode_head.num_convs must be >= 0, got {num_convs}")
        if num_convs == 0 and in_channels != channels:
            raise ValueError("decode_head.num_convs=0 needs in_channels == channels "
                             f"(got {in_channels} and {channels})")
        convs = []
        if num_convs > 0:
            if compress:
                convs.append(ConvModule(in_channels, channels, 1, dtype=dtype, rngs=rngs))
                convs.append(ConvModule(channels, channels, kernel_size, dtype=dtype, rngs=rngs))
            else:
                convs.append(ConvModule(in_channels, channels, kernel_size, dtype=dtype, rngs=rngs))
            convs += [ConvModule(channels, channels, kernel_size, dtype=dtype, rngs=rngs)
                      for _ in range(num_convs - 1)]
        self.convs = nnx.List(convs)
        self.conv_cat = (ConvModule(in_channels + channels, channels, kernel_size, dtype=dtype, rngs=rngs)
                         if concat_input else None)
        # The head starts with a bare linear map when its first layer is the bias-free 1x1 ``compress`` conv
        # and its input is not needed again (no ``conv_cat``). That map commutes with bilinear resampling
        # (weights that sum to 1), so ``head(resize(x)) == from_projected(resize(project(x)))``: crops and
        # windows can be cut from the narrow projected map (64 channels) instead of the features (720).
        self.linear_stem = bool(compress and num_convs > 0 and not concat_input)
        # mmseg uses Dropout2d: whole channels are dropped, hence broadcasting over H and W.
        self.dropout = (nnx.Dropout(dropout_ratio, broadcast_dims=(1, 2), rngs=rngs)
                        if dropout_ratio > 0 else None)
        # BaseDecodeHead init: conv_seg ~ Normal(0, 0.01), bias 0.
        self.conv_seg = conv(channels, num_classes, 1, use_bias=True,
                             kernel_init=_host_normal_init(lambda shape: 0.01), dtype=dtype, rngs=rngs)
        self.num_classes = num_classes

    def project(self, x: Array) -> Array:
        """The linear stem (identity when there is none); see ``linear_stem``."""
        return self.convs[0].conv(x) if self.linear_stem else x

    def from_projected(self, p: Array) -> Array:
        """The rest of the head after ``project``: ``head(x) == from_projected(project(x))``."""
        if not self.linear_stem:
            return self(p)
        out = self.convs[0].after_conv(p)
        for layer in self.convs[1:]:
            out = layer(out)
        return self._classify(out)

    def __call__(self, x: Array) -> Array:
        out = x
        for layer in self.convs:
            out = layer(out)
        return self._classify(out, x)

    def _classify(self, out: Array, x: Array | None = None) -> Array:
        if self.conv_cat is not None:
            out = self.conv_cat(jax.numpy.concatenate([x, out], axis=-1))
        if self.dropout is not None:
            out = self.dropout(out)
        return self.conv_seg(out)
