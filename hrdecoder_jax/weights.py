"""Import PyTorch (mmseg-format) weights into the Flax models (the library of the ``convert`` command).

Accepted sources: a ``.pth``/``.pt`` file (read with ``torch.load(weights_only=True)``, numpy scalars allowed in
its ``meta`` as mmcv writes them), an ``.npz`` of the same keys, or a mapping of name to array/tensor. Handled on the way in: a ``state_dict`` wrapper, DDP's
``module.`` prefix, and the ImageNet HRNetV2 checkpoints (``hrnetv2_w18-00eb2006.pth``,
``hrnetv2_w48-d2186c55.pth``), whose keys have no ``backbone.`` prefix and whose classification layers
(``incre_modules``, ``downsamp_modules``, ``final_layer``, ``classifier``) are ignored.

Names map mechanically because the Flax attributes mirror the mmseg module tree: a parameter path
``backbone.stage2.0.branches.0.0.conv1.kernel`` is the tensor ``backbone.stage2.0.branches.0.0.conv1.weight``
(OIHW -> HWIO), BN ``scale/bias/mean/var`` are ``weight/bias/running_mean/running_var``.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from hrdecoder_jax.errors import ExpectedError

# ImageNet classification parts of the MSRA HRNetV2 checkpoints, unused by segmentation.
CLASSIFICATION_PREFIXES = ("incre_modules.", "downsamp_modules.", "final_layer.", "classifier.")
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
                  "var": "running_var"}


class WeightImportError(ExpectedError, ValueError):
    """A weight file that cannot be loaded into the model (the message names the key or file)."""


@dataclasses.dataclass
class LoadReport:
    """What ``load_torch_weights`` did. Key names are PyTorch (mmseg) names."""

    loaded: list[str]
    missing: list[str]       # model tensors the source did not provide (left as they were)
    unexpected: list[str]    # source tensors the model has no place for
    ignored: list[str]       # known-unused source tensors (classification head, num_batches_tracked)

    def summary(self) -> str:
        lines = [f"loaded {len(self.loaded)} tensors; {len(self.missing)} missing, "
                 f"{len(self.unexpected)} unexpected, {len(self.ignored)} ignored"]
        for title, keys in (("missing", self.missing), ("unexpected", self.unexpected)):
            if keys:
                lines.append(f"  {title}: " + ", ".join(_compress_keys(keys)))
        return "\n".join(lines)


def _compress_keys(keys: list[str], limit: int = 12) -> list[str]:
    """Group long key lists by module prefix so a report stays readable."""
    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault(k.rsplit(".", 1)[0], []).append(k)
    items = [f"{p}.* ({len(ks)})" if len(ks) > 1 else ks[0] for p, ks in groups.items()]
    return items[:limit] + ([f"... {len(items) - limit} more modules"] if len(items) > limit else [])


def torch_name(path: tuple) -> str:
    """Flax state path -> mmseg state_dict key."""
    *prefix, leaf = (str(p) for p in path)
    return ".".join(prefix + [_LEAF_TO_TORCH.get(leaf, leaf)])


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        return value.detach().cpu().float().numpy() if value.is_floating_point() else value.cpu().numpy()
    return np.asarray(value)


def _numpy_globals() -> list:
    """What mmcv's checkpoints pickle besides tensors: numpy scalars and dtypes in ``meta`` (a ``best_score``
    when the config sets ``evaluation=dict(save_best=...)``, as the original's configs do). Allowed to
    ``torch.load(weights_only=True)``, which still runs no code: numpy's scalar constructor under both of
    its names (numpy 1 writes ``numpy.core.multiarray.scalar``, numpy 2 ``numpy._core...``), ``numpy.dtype``
    and numpy's dtype classes."""
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # numpy 1
        from numpy.core.multiarray import scalar
    allowed = [(scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"), np.dtype]
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        allowed += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType")]
    return allowed


def read_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Read a state_dict from a path (``.pth``/``.pt``/``.npz``) or mapping; unwrap and strip prefixes."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such weight file")
        if path.endswith(".npz"):
            try:
                with np.load(path, allow_pickle=False) as z:
                    raw: Mapping[str, Any] = {k: z[k] for k in z.files}
            except Exception as e:  # noqa: BLE001 - a truncated or foreign file: one line naming it
                raise WeightImportError(f"{path}: not a readable .npz state_dict ({type(e).__name__}: "
                                        f"{str(e).splitlines()[0] if str(e) else ''})") from None
        else:
            try:
                import torch
            except ImportError:
                raise WeightImportError(f"{path}: reading .pth files needs PyTorch; install the [torch] extra "
                                        "or pass an .npz of the same keys") from None
            try:
                with torch.serialization.safe_globals(_numpy_globals()):
                    raw = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - torch raises many kinds; one line names the file
                first = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else ""
                raise WeightImportError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: "
                                        f"{first[:200]})") from None
    else:
        raw = source
    if isinstance(raw, Mapping) and "state_dict" in raw and isinstance(raw["state_dict"], Mapping):
        raw = raw["state_dict"]
    if not isinstance(raw, Mapping):
        raise WeightImportError(f"{source}: expected a mapping of tensor names, got {type(raw).__name__}")
    out = {}
    for key, value in raw.items():
        key = re.sub(r"^(module\.)+", "", key)
        out[key] = _to_numpy(value)
    # ImageNet HRNet checkpoints are bare backbones: give them the segmentor's prefix.
    if not any(k.startswith(("backbone.", "decode_head.", "multiscale_compressor.")) for k in out):
        out = {("backbone." + k if not k.startswith(CLASSIFICATION_PREFIXES) else k): v for k, v in out.items()}
    return out


def _to_flax_layout(name: str, value: np.ndarray, target_shape: tuple) -> np.ndarray:
    if value.ndim == 4:  # conv OIHW -> HWIO
        value = value.transpose(2, 3, 1, 0)
    if tuple(value.shape) != tuple(target_shape):
        torch_shape = tuple(target_shape[i] for i in (3, 2, 0, 1)) if len(target_shape) == 4 else tuple(target_shape)
        src_shape = tuple(value.transpose(3, 2, 0, 1).shape) if value.ndim == 4 else tuple(value.shape)
        raise WeightImportError(f"shape mismatch for {name}: checkpoint has {src_shape}, "
                                f"model expects {torch_shape}")
    return value


def load_torch_weights(model: nnx.Module, source: str | os.PathLike | Mapping[str, Any]) -> LoadReport:
    """Fill ``model`` in place with the tensors of an mmseg state_dict; return what matched.

    Parameters and BN running statistics are both loaded. A shape mismatch raises ``WeightImportError``
    naming the key and both shapes; missing and unexpected keys are reported, not fatal.
    """
    tensors = read_state_dict(source)
    state = nnx.state(model, (nnx.Param, nnx.BatchStat))
    flat = dict(nnx.to_flat_state(state))
    loaded, missing, seen = [], [], set()
    for path, variable in flat.items():
        name = torch_name(path)
        if name not in tensors:
            missing.append(name)
            continue
        target = variable[...]
        value = _to_flax_layout(name, tensors[name], target.shape)
        variable[...] = jnp.asarray(value, dtype=target.dtype)
        loaded.append(name)
        seen.add(name)
    ignored, unexpected = [], []
    for name in tensors:
        if name in seen:
            continue
        if name.endswith("num_batches_tracked") or name.startswith(CLASSIFICATION_PREFIXES):
            ignored.append(name)
        else:
            unexpected.append(name)
    nnx.update(model, nnx.from_flat_state(flat))
    return LoadReport(loaded=loaded, missing=missing, unexpected=unexpected, ignored=ignored)
