"""``python -m hrdecoder_jax.convert``: PyTorch (mmseg-format) weights into an Orbax workdir.

Reads an mmseg state_dict (``.pth`` read with ``weights_only=True``, or ``.npz``; the library is
``hrdecoder_jax.weights``), loads it into the config's model and writes a model-only checkpoint that
``evaluate``, ``predict`` and ``--config.init_from`` take::

  python -m hrdecoder_jax.convert --config configs/idrid.py --torch_checkpoint hrdecoder_idrid.pth --workdir runs/idrid
"""
from __future__ import annotations

import os

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
    from flax import nnx

    from hrdecoder_jax import checkpoint, cli
    from hrdecoder_jax.models import build_model
    from hrdecoder_jax.weights import load_torch_weights, read_state_dict
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
