"""``python -m hrdecoder_jax.evaluate``: the reference lesion metrics of a checkpoint, with its reports.

The loop is ``hrdecoder_jax.evaluation.evaluate`` and the report writers are ``hrdecoder_jax.reports``;
this module is the command, which restores an Orbax checkpoint written by training or by ``convert``::

    python -m hrdecoder_jax.evaluate --config configs/idrid.py --workdir runs/idrid \\
        [--checkpoint best|latest|STEP] [--split test] [--output DIR] [--config.eval.max_images=5]

prints the per-lesion table and writes ``metrics.json`` (which also records the step, checkpoint folder and
workdir it scored), ``per_image.csv`` and ``pr_curves.png`` into ``--output`` (default
``WORKDIR/eval_<split>_<step>/``). Each file is written under a temporary name and renamed when complete,
after the table is printed: an interruption or a full disk never leaves a partial file, and the error
names the file.
"""
from __future__ import annotations

import os
import sys

from hrdecoder_jax.evaluation import evaluate
from hrdecoder_jax.reports import write_outputs

# ----------------------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------------------


def define_flags(fv) -> None:
    from absl import flags

    from hrdecoder_jax import cli
    flags.DEFINE_string("workdir", None, "Training or convert directory holding the Orbax checkpoint.", flag_values=fv)
    flags.mark_flag_as_required("workdir", flag_values=fv)
    cli.define_checkpoint_flag(fv)
    flags.DEFINE_string("split", None, "Split to score (default config.eval.split).", flag_values=fv)
    flags.DEFINE_string("output", None, "Output folder (default WORKDIR/eval_<split>_<step>).", flag_values=fv)
    flags.DEFINE_bool("progress", True, "Print one line per image.", flag_values=fv)


def run(fv) -> int:
    from hrdecoder_jax import checkpoint, cli, config_utils
    from hrdecoder_jax.data import open_split
    from hrdecoder_jax.metrics import format_table
    from hrdecoder_jax.workdir import eval_dir

    config = fv.config
    config_utils.validate_config(config)
    split = fv.split or config.eval.split
    which = cli.checkpoint_choice(fv.checkpoint)
    # Where the outputs go is checked before the model runs (the step is known only after restoring,
    # so the default folder's parent, the workdir, is what is checked first).
    workdir = os.path.expanduser(fv.workdir)
    if fv.output:
        cli.check_writable_dir(fv.output, "--output")
    elif os.path.isdir(workdir):
        cli.check_writable_dir(workdir, "the workdir (default --output)")
    model, meta = checkpoint.restore_for_inference(config, workdir, which)
    step = meta.get("step", 0)
    print(f"restored {fv.workdir} ({fv.checkpoint}, step {step})", file=sys.stderr, flush=True)
    dataset = open_split(config.data, split)
    run_dir = workdir                       # a step's own folder as --workdir: its run's folder, not inside it
    scored_dir = os.path.dirname(meta.get("checkpoint") or "")
    if os.path.basename(scored_dir) in (checkpoint.LATEST_DIR, checkpoint.BEST_DIR) and \
            os.path.abspath(workdir) == meta.get("checkpoint"):
        run_dir = os.path.dirname(scored_dir)
    out_dir = cli.check_writable_dir(fv.output or eval_dir(run_dir, split, step), "--output")
    results = evaluate(model, config, dataset=dataset, progress=fv.progress)
    # The table first: whatever happens to the files, the result is on the screen.
    print(f"{config.data.name} {split} split, step {step}, {results['num_images']} images "
          f"({results['seconds']:.1f}s):")
    print(format_table(results), end="", flush=True)
    scored = {"step": step, "checkpoint": meta.get("checkpoint"), "workdir": os.path.abspath(workdir),
              "which": fv.checkpoint, "split": split, "dataset": config.data.name}
    paths = write_outputs(results, out_dir, title=f"{config.data.name} {split}, step {step}, "
                                                  f"{results['num_images']} images", scored=scored)
    print(f"wrote {', '.join(paths.values())}", flush=True)
    return 0


def main(argv=None) -> int:
    """``python -m hrdecoder_jax.evaluate`` (``argv``: the arguments, without the program name)."""
    from hrdecoder_jax import cli
    return cli.main("evaluate", __doc__, define_flags, run, argv, purpose="inference")


if __name__ == "__main__":
    from hrdecoder_jax.cli import run_as_main
    run_as_main("hrdecoder_jax.evaluate")
