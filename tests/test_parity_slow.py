"""Float64 identity at the paper's scale: HRNetV2-W48 at full depth (slow; not part of the default run).

    python -m pytest -q -m slow tests/test_parity_slow.py      # with HRDECODER_REFERENCE_EXPORTS=DIR

``DIR`` holds exports of the original code made locally with the reference tools (the commands are in
``tests/fixtures/README.md``, "Paper-scale exports"; the W48 weights are 250 MB per export, too big for the
repository): for each tag, ``<tag>_io.npz`` + ``<tag>_seed3_state_dict.pth`` (float32 export) and
``<tag>_f64.npz`` (the same weights and input through the original in float64). Tags: ``w48_512_hr256`` (512 px
image, hr_scale 256, every gradient) and ``w48_1920_hr960`` (one 1920 px IDRiD window, hr_scale 960, the
paper's train and test size: logits, losses and the gradients the export holds).
"""
import json
import os
import pathlib

import jax
import numpy as np
import pytest

from hrdecoder_jax import config_utils
from test_parity_f64 import bn_statistics, nhwc, rel_err, run_float64

pytestmark = pytest.mark.slow
TOLERANCE = 1e-10
TAGS = ("w48_512_hr256", "w48_1920_hr960")


@pytest.fixture(scope="module")
def exports() -> pathlib.Path:
    where = os.environ.get("HRDECODER_REFERENCE_EXPORTS")
    if not where:
        raise RuntimeError("set HRDECODER_REFERENCE_EXPORTS to the folder of the paper-scale exports "
                           "(tests/fixtures/README.md says how to make them)")
    return pathlib.Path(where).expanduser()


@pytest.mark.parametrize("tag", TAGS)
def test_w48_is_identical_to_the_original_in_float64(exports, tag):
    io = np.load(exports / f"{tag}_io.npz")
    ref = dict(np.load(exports / f"{tag}_f64.npz"))
    meta = json.loads(str(io["meta"]))
    assert meta["width"] == 48 and meta["blocks"] is None and meta["modules"] is None   # full W48 depth
    cfg = config_utils.model_config(width=48, hr_scale=tuple(meta["hr_scale"]), crop_num=meta["crop_num"])
    with jax.enable_x64(True):
        logits, losses, grads, model = run_float64(cfg, exports / f"{tag}_seed{meta['seed']}_state_dict.pth",
                                                   io["input"], io["train_label"], io["train_crop_boxes"])
    errors = {"fused logits": rel_err(logits, nhwc(ref["fused_logits"]))}
    for ours, theirs in (("hr", "hr.loss_seg"), ("fuse", "fuse.loss_seg"), ("total", "total")):
        errors[f"loss {ours}"] = rel_err(losses[ours], ref[f"train_loss/{theirs}"])
    names = [k[len("train_grad/"):] for k in ref if k.startswith("train_grad/")]
    assert names, "the export holds no gradients"
    grad_errors = {n: rel_err(grads[n], ref[f"train_grad/{n}"]) for n in names}
    worst = max(grad_errors, key=grad_errors.get)
    errors[f"{len(names)} gradients (worst {worst})"] = grad_errors[worst]
    stats = bn_statistics(model)
    errors["head BN statistics"] = max(rel_err(stats[k[len("train_buffer/"):]], ref[k])
                                       for k in ref if k.startswith("train_buffer/"))
    print(f"\n{tag}: " + ", ".join(f"{k} {v:.1e}" for k, v in errors.items()))
    assert all(v < TOLERANCE for v in errors.values()), errors
