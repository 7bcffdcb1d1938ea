"""Import PyTorch (mmseg-format) weights into the Flax models, and the ``convert`` command.

Accepted sources: a ``.pth``/``.pt`` file (read with ``torch.load(weights_only=True)``, numpy scalars allowed in
its ``meta`` as mmcv writes them), an ``.npz`` of the same keys, or a mapping of name to array/tensor. Handled on the way in: a ``state_dict`` wrapper, DDP's
``module.`` prefix, and the ImageNet HRNetV2 checkpoints (``hrnetv2_w18-00eb2006.pth``,
``hrnetv2_w48-d2186c55.pth``), whose keys have no ``backbone.`` prefix and whose classification layers
(``incre_modules``, ``downsamp_modules``, ``final_layer``, ``classifier``) are ignored.

Names map mechanically because the Flax attributes mirror the mmseg module tree: a parameter path
``backbone.stage2.0.branches.0.0.conv1.kernel`` is the tensor ``backbone.stage2.0.branches.0.0.conv1.weight``
(OIHW -> HWIO), BN ``scale/bias/mean/var`` are ``weight/bias/running_mean/running_var``.

  python -m hrdecoder_jax.convert --config configs/idrid.py --torch_checkpoint hrdecoder_idrid.pth --workdir runs/idrid
"""
from __future__ import annotations

import dataclasses
import os
import re
import sys
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


MIN_LOADED_FRACTION = 0.5   # convert refuses a source that fills less than this share of the model's tensors


def define_flags(fv) -> None:
    from absl import flags
    flags.DEFINE_string("torch_checkpoint", None, "PyTorch .pth or .npz state_dict to import.", flag_values=fv)
    flags.DEFINE_string("workdir", None, "Directory that receives the Orbax checkpoint.", flag_values=fv)
    flags.DEFINE_bool("strict", False, "Fail when any model tensor is missing or any source tensor unexpected.",
                      flag_values=fv)
    flags.DEFINE_bool("allow_partial", False, "Write the checkpoint even when the source fills fewer than "
                      f"{MIN_LOADED_FRACTION:.0%} of the model's tensors (the rest stay randomly initialised).",
                      flag_values=fv)
    flags.mark_flags_as_required(["torch_checkpoint", "workdir"], flag_values=fv)


def run(fv) -> int:
    from hrdecoder_jax import checkpoint, cli
    from hrdecoder_jax.models import build_model
    from hrdecoder_jax.workdir import WorkdirLock, check_writable

    workdir = check_writable(fv.workdir)                 # before reading anything
    tensors = read_state_dict(fv.torch_checkpoint)
    model = build_model(fv.config.model, rngs=nnx.Rngs(0))
    report = load_torch_weights(model, tensors)
    print(report.summary())
    total = len(report.loaded) + len(report.missing)
    if fv.strict and (report.missing or report.unexpected):
        raise cli.CommandError(f"--strict: {len(report.missing)} missing and {len(report.unexpected)} unexpected keys "
                               f"in {fv.torch_checkpoint}")
    if len(report.loaded) < MIN_LOADED_FRACTION * total and not fv.allow_partial:
        raise cli.CommandError(
            f"{fv.torch_checkpoint} fills only {len(report.loaded)} of the model's {total} tensors (fewer than "
            f"{MIN_LOADED_FRACTION:.0%}): not a checkpoint of this config's model? Nothing written; pass "
            "--allow_partial to write it anyway")
    with WorkdirLock(workdir, "convert"):
        path = checkpoint.save_model(workdir, model, config=fv.config, source=os.path.basename(fv.torch_checkpoint))
    print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    """``python -m hrdecoder_jax.convert --config CONFIG --torch_checkpoint FILE --workdir DIR``."""
    from hrdecoder_jax import cli
    return cli.main("convert", __doc__, define_flags, run, argv, purpose="inference", tensorflow=False)


if __name__ == "__main__":
    from hrdecoder_jax.cli import run_as_main
    run_as_main("hrdecoder_jax.convert")
