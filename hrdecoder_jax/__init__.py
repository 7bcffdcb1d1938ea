"""hrdecoder-jax: HRDecoder (Ding et al., MICCAI 2024) for tiny fundus-lesion segmentation in JAX/Flax NNX."""

__version__ = "0.1.0"

LESIONS = ("EX", "HE", "SE", "MA")
"""Lesion classes in channel order of every logit/probability map: hard exudates, haemorrhages,
soft exudates, microaneurysms. Label maps use 0 for background and 1..4 for these."""
