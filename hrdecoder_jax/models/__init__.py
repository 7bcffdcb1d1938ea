"""Models: HRNetV2 backbone, FCN head, and the HRDecoder / Efficient-HRDecoder / FCN segmentors.

``build_model(model_config, rngs=...)`` returns the segmentor that ``model_config.type`` names.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from hrdecoder_jax.config_utils import ConfigError
from hrdecoder_jax.models.head import FCNHead
from hrdecoder_jax.models.hrnet import HRNet
from hrdecoder_jax.models.segmentor import FCNSegmentor, HRDecoder, slide_windows

SEGMENTORS = {
    "HRDecoder": HRDecoder,
    "EfficientHRDecoder": HRDecoder,   # differs only by hr_settings.visual_dim (the compressor)
    "FCN": FCNSegmentor,
}


def build_model(model_config: Mapping[str, Any], *, rngs: nnx.Rngs) -> nnx.Module:
    """Build the segmentor named by ``model_config.type`` (``HRDecoder``, ``EfficientHRDecoder``, ``FCN``)."""
    for key in ("type", "dtype", "backbone", "decode_head"):
        if key not in model_config:
            raise ConfigError(f"model lacks {key} (build model configs with hrdecoder_jax.config_utils.model_config)")
    kind = model_config["type"]
    if kind not in SEGMENTORS:
        raise ConfigError(f"model.type must be one of {sorted(SEGMENTORS)}, got {kind!r}")
    if kind == "EfficientHRDecoder" and not model_config["hr_settings"].get("visual_dim"):
        raise ConfigError("model.hr_settings.visual_dim must be set for model.type='EfficientHRDecoder'")
    dtype = model_config["dtype"] or "float32"
    if jnp.dtype(dtype) == jnp.float64 and not jax.config.read("jax_enable_x64"):
        # Without 64-bit mode JAX silently makes every float64 array float32.
        raise ConfigError("model.dtype='float64' needs 64-bit JAX: set JAX_ENABLE_X64=1 in the environment "
                          "(or jax.config.update('jax_enable_x64', True) before building the model)")
    return SEGMENTORS[kind](model_config, rngs=rngs)


def count_params(model: nnx.Module) -> int:
    """Number of learnable parameters (BN running statistics excluded, as in PyTorch's parameters())."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


__all__ = ["build_model", "count_params", "HRNet", "FCNHead", "HRDecoder", "FCNSegmentor",
           "slide_windows", "SEGMENTORS"]
