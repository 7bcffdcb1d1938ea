"""``python -m hrdecoder_jax.export``: a checkpoint as an artifact that runs without this package.

    python -m hrdecoder_jax.export --config configs/idrid.py --workdir runs/idrid --output exported/ \\
        [--checkpoint best|latest|STEP] [--format stablehlo|onnx|stablehlo,onnx] [--platforms cpu|cpu,cuda]

writes into ``--output``:

* ``model.stablehlo`` (``--format stablehlo``, the default): ``jax.export``, serialised; load it with
  ``hrdecoder_jax.export.load(DIR)`` (``hrdecoder_jax.serving``, which needs JAX and NumPy only);
* ``model.onnx`` (``--format onnx``, the ``onnx`` extra): the same function through ``jax2onnx``, for ONNX
  Runtime and other ONNX runtimes;
* ``manifest.json``: config name and digest, checkpoint step, test scale, lesion order, layout,
  normalisation, the rule back to the photo's size, platforms, jax/jaxlib versions.

The exported function: uint8 RGB images ``[B, H, W, 3]`` already resized to ``data.test_scale`` ->
normalisation -> ``model.test_cfg`` (slide or whole, flip, window weighting) -> ``probabilities`` and
``logits`` ``[B, H, W, 4]`` (EX, HE, SE, MA), ``B`` symbolic. The folder is written as a whole (a temporary
sibling renamed into place): an interrupted export leaves no half-written artifact, and a previous export
in ``--output`` is replaced only by a complete one.
"""
from __future__ import annotations

import os
import sys


def load(directory: str):
    """The StableHLO artifact in ``directory``, ready to run (``hrdecoder_jax.serving.load``; imports JAX
    and NumPy only)."""
    from hrdecoder_jax.serving import load as load_artifact
    return load_artifact(directory)


def _list(value: str) -> list[str]:
    return [v.strip() for v in str(value).split(",") if v.strip()]


def define_flags(fv) -> None:
    from absl import flags

    from hrdecoder_jax import cli
    flags.DEFINE_string("workdir", None, "Training or convert directory holding the Orbax checkpoint.", flag_values=fv)
    cli.define_checkpoint_flag(fv)
    flags.DEFINE_string("output", None, "Folder for the artifacts and manifest.json (new, empty, or a previous "
                        "export, which is replaced).", flag_values=fv)
    flags.DEFINE_string("format", "stablehlo", "stablehlo, onnx, or both: stablehlo,onnx.", flag_values=fv)
    flags.DEFINE_string("platforms", "cpu", "StableHLO: the platforms to lower for, e.g. cpu or cpu,cuda.",
                        flag_values=fv)
    flags.mark_flags_as_required(["workdir", "output"], flag_values=fv)
    flags.register_validator("format", lambda v: bool(_list(v)) and all(f in ("stablehlo", "onnx") for f in _list(v)),
                             message="--format must be stablehlo, onnx or stablehlo,onnx", flag_values=fv)
    flags.register_validator("platforms", lambda v: bool(_list(v)) and all(p in ("cpu", "cuda", "rocm", "tpu")
                                                                           for p in _list(v)),
                             message="--platforms must be a comma list of cpu, cuda, rocm, tpu", flag_values=fv)


def run(fv) -> int:
    from hrdecoder_jax import checkpoint, cli, deploy
    from hrdecoder_jax.serving import ONNX_FILE, STABLEHLO_FILE

    formats = [f for f in deploy.FORMATS if f in _list(fv.format)]
    platforms = _list(fv.platforms)
    try:
        out_dir = deploy.check_output_dir(fv.output)                        # before the model is built
    except deploy.ExportError as e:
        raise cli.CommandError(str(e)) from None
    cli.check_writable_dir(os.path.dirname(out_dir), "the parent of --output")
    if "onnx" in formats:
        import importlib.util
        if importlib.util.find_spec("jax2onnx") is None or importlib.util.find_spec("onnx") is None:
            raise cli.CommandError("--format onnx needs jax2onnx and onnx: pip install -c requirements-lock.txt "
                                   "-e '.[onnx]'")
    model, meta = checkpoint.restore_for_inference(fv.config, fv.workdir, cli.checkpoint_choice(fv.checkpoint))
    step = meta.get("step")
    print(f"restored {fv.workdir} ({fv.checkpoint}, step {step})", file=sys.stderr, flush=True)
    try:
        fn = deploy.serving_function(model, fv.config)
        spec = deploy.input_spec(fv.config)
        files = {}
        if "stablehlo" in formats:
            blob = deploy.export_stablehlo(fn, spec, platforms)

            from hrdecoder_jax.workdir import write_file
            files[STABLEHLO_FILE] = lambda path, blob=blob: write_file(path, blob)
        if "onnx" in formats:
            files[ONNX_FILE] = lambda path: deploy.export_onnx(fn, spec, path)
        extra = {}
        if "onnx" in formats:
            from importlib.metadata import version
            extra["onnx"] = {"opset": deploy.ONNX_OPSET, "jax2onnx": version("jax2onnx"),
                             "platform_dependent_branches": "default (the CPU fusion fences are XLA's)"}
        doc = deploy.manifest(fv.config, config_name=os.path.basename(fv["config"].config_filename), step=step,
                              which=cli.checkpoint_choice(fv.checkpoint), formats=formats, platforms=platforms,
                              extra=extra)
        out_dir = deploy.write_export(out_dir, files, doc)
    except deploy.ExportError as e:
        raise cli.CommandError(str(e)) from None
    sizes = ", ".join(f"{name} ({os.path.getsize(os.path.join(out_dir, name)) / 2**20:.1f} MiB)"
                      for name in sorted(os.listdir(out_dir)))
    print(f"wrote {out_dir}: {sizes}", flush=True)
    return 0


def main(argv=None) -> int:
    """``python -m hrdecoder_jax.export`` (``argv``: the arguments, without the program name)."""
    from hrdecoder_jax import cli
    return cli.main("export", __doc__, define_flags, run, argv, purpose="inference")


if __name__ == "__main__":
    from hrdecoder_jax.cli import run_as_main
    run_as_main("hrdecoder_jax.export")
