"""Import PyTorch (mmseg-format) weights into the Flax models, and the ``convert`` command.

Accepted sources: a ``.pth``/``.pt`` file (read with ``torch.load(weights_only=True)``), an ``.npz`` of the same
keys, or a mapping of name to array/tensor. Handled on the way in: a ``state_dict`` wrapper, DDP's
``module.`` prefix, and the ImageNet HRNetV2 checkpoints (``hrnetv2_w18-00eb2006.pth``,
``hrnetv2_w48-d2186c55.pth``), whose keys have no ``backbone.`` prefix and whose classification layers
(``incre_modules``, ``downsamp_modules``, ``final_layer``, ``classifier``) are ignored.

Names map mechanically because the Flax attributes mirror the mmseg module tree: a parameter path
``backbone.stage2.0.branches.0.0.conv1.kernel`` is the tensor ``backbone.stage2.0.branches.0.0.conv1.weight``
(OIHW -> HWIO), BN ``scale/bias/mean/var`` are ``weight/bias/running_mean/running_var``.

  python -m hrdecoder_jax.convert --config configs/idrid.py --torch-checkpoint hrdecoder_idrid.pth --workdir runs/idrid
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# ImageNet classification parts of the MSRA HRNetV2 checkpoints, unused by segmentation.
CLASSIFICATION_PREFIXES = ("incre_modules.", "downsamp_modules.", "final_layer.", "classifier.")
_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias", "mean": "running_mean",
                  "var": "running_var"}


class WeightImportError(ValueError):
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


def read_state_dict(source: str | os.PathLike | Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Read a state_dict from a path (``.pth``/``.pt``/``.npz``) or mapping; unwrap and strip prefixes."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such weight file")
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as z:
                raw: Mapping[str, Any] = {k: z[k] for k in z.files}
        else:
            try:
                import torch
            except ImportError:
                raise WeightImportError(f"{path}: reading .pth files needs PyTorch; install the [torch] extra "
                                        "or pass an .npz of the same keys") from None
            try:
                raw = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - torch raises many kinds; one line names the file
                raise WeightImportError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}: "
                                        f"{str(e).splitlines()[0] if str(e) else ''})") from None
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


def main(argv=None) -> None:
    """``python -m hrdecoder_jax.convert --config CONFIG --torch-checkpoint FILE --workdir DIR``."""
    from absl import app, flags, logging
    from ml_collections import config_flags

    from hrdecoder_jax import checkpoint
    from hrdecoder_jax.models import build_model

    flags_ = flags.FLAGS
    config_flags.DEFINE_config_file("config", None, "Config file (model section is used).", lock_config=True)
    flags.DEFINE_string("torch_checkpoint", None, "PyTorch .pth or .npz state_dict to import.")
    flags.DEFINE_string("workdir", None, "Directory that receives the Orbax checkpoint.")
    flags.DEFINE_bool("strict", False, "Fail when any model tensor is missing or any source tensor unexpected.")
    flags.mark_flags_as_required(["config", "torch_checkpoint", "workdir"])

    def run(_):
        config = flags_.config
        model = build_model(config.model, rngs=nnx.Rngs(0))
        report = load_torch_weights(model, flags_.torch_checkpoint)
        logging.info("%s", report.summary())
        print(report.summary())
        if flags_.strict and (report.missing or report.unexpected):
            raise SystemExit(f"--strict: {len(report.missing)} missing and {len(report.unexpected)} unexpected keys")
        path = checkpoint.save_model(flags_.workdir, model, config=config,
                                     source=os.path.basename(flags_.torch_checkpoint))
        print(f"wrote {path}")

    app.run(run, argv=argv)


if __name__ == "__main__":
    main()
