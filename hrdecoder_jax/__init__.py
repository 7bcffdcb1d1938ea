"""hrdecoder-jax: HRDecoder (Ding et al., MICCAI 2024) for tiny fundus-lesion segmentation in JAX/Flax NNX."""

from hrdecoder_jax import runtime as _runtime

__version__ = "0.1.0"

LESIONS = ("EX", "HE", "SE", "MA")
"""Lesion classes in channel order of every logit/probability map: hard exudates, haemorrhages,
soft exudates, microaneurysms. Label maps use 0 for background and 1..4 for these."""


def setup(purpose: str = "train") -> None:
    """What every command does first, for the Python API: XLA's CPU options for ``purpose`` ('train' or
    'inference'; exact float32 gradients, the faster convolution path), the persistent compilation cache,
    TensorFlow kept off accelerators. Call it before the first JAX computation. Importing the package
    already applies the training options when JAX's backend has not started (``runtime``)."""
    _runtime.configure(purpose)


# The commands' CPU options for API users who never call setup(): only while JAX's backend has not started
# (XLA reads its flags once); the user's own XLA_FLAGS choice is left alone.
_runtime.apply_xla_cpu_flags("train")
