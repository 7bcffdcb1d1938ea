"""evaluate / predict / inspect notebook: parity with the reference through slide inference, streamed
metrics equal to the direct computation, the commands' outputs, and the notebook runs.

Models are built abstractly (``nnx.eval_shape``) and filled from the reference weights: an eager random
init of even the tiny model costs ~20 s of CPU.
"""
import csv
import errno
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import cfg_with
from hrdecoder_jax import LESIONS, cli
from hrdecoder_jax.models import build_model

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.py")


def reference_model(config, fixtures_dir):
    """The tiny model with the reference weights (state_dict .npz), in eval mode."""
    from hrdecoder_jax.weights import load_torch_weights

    model = nnx.eval_shape(lambda: build_model(config.model, rngs=nnx.Rngs(0)))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nnx.state(model))
    nnx.update(model, zeros)
    report = load_torch_weights(model, fixtures_dir / "tiny_w18_256_hr128_seed0_state_dict.npz")
    assert not report.missing, report.summary()
    model.eval()
    return model


@pytest.fixture(scope="module")
def workdir(converted):
    """The reference weights' model-only checkpoint (``conftest.converted``)."""
    return converted


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory):
    config = cli.load_config(TINY)
    config.data.data_dir = str(tmp_path_factory.mktemp("tfds"))
    return config


@pytest.fixture(scope="module")
def restored(workdir, tiny_config):
    from hrdecoder_jax.checkpoint import restore_for_inference
    from hrdecoder_jax.inference import make_forward

    model, meta = restore_for_inference(tiny_config, str(workdir), "latest")
    return model, make_forward(model), meta


# ----------------------------------------------------------------------------------------------------------
# Slide inference
# ----------------------------------------------------------------------------------------------------------


def test_converted_checkpoint_reproduces_reference_fused_logits(restored, fixtures_dir):
    from hrdecoder_jax.inference import inference

    _, forward, meta = restored
    assert meta["step"] == 0
    io = np.load(fixtures_dir / "tiny_w18_256_hr128_io.npz")
    images = jnp.asarray(io["input"].transpose(0, 2, 3, 1))            # NCHW -> NHWC
    expected = io["fused_logits"].transpose(0, 2, 3, 1)
    test_cfg = {"mode": "slide", "crop_size": (256, 256), "stride": (128, 128), "flip": False}
    logits = np.asarray(inference(forward, images, test_cfg))
    assert logits.shape == expected.shape == (1, 256, 256, 4)
    rel = np.max(np.abs(logits - expected)) / np.max(np.abs(expected))
    assert rel < 2e-5, rel


def _axis_spans(n, c, s):
    """Windows of ``c`` along an axis of ``n`` by the slide grid's definition, not by the grid-count formula
    the code uses: one every ``s`` from 0 until a window reaches the far border; that last one is moved back
    to end at the border (an axis shorter than the window: one span, the whole axis)."""
    spans, start = [], 0
    while start + c < n:
        spans.append((start, start + c))
        start += s
    return spans + [(max(n - c, 0), n)]


def _reference_windows(h, w, ch, cw, sh, sw):
    """mmseg ``slide_inference``'s boxes ``(y1, y2, x1, x2)``, row-major (rows outer)."""
    return [(y1, y2, x1, x2) for y1, y2 in _axis_spans(h, ch, sh) for x1, x2 in _axis_spans(w, cw, sw)]


def test_reference_windows_by_hand():
    """The oracle on cases worked out by hand (the last three from SPEC's outer slide and mmseg's rule)."""
    assert _axis_spans(6, 4, 2) == [(0, 4), (2, 6)]
    assert _axis_spans(9, 4, 3) == [(0, 4), (3, 7), (5, 9)]             # 6 -> 5: shifted inward
    assert _axis_spans(8, 4, 2) == [(0, 4), (2, 6), (4, 8)]             # the last one fits exactly
    assert _axis_spans(8, 4, 4) == [(0, 4), (4, 8)]
    assert _axis_spans(4, 4, 2) == [(0, 4)]
    assert _axis_spans(3, 4, 2) == [(0, 3)]                             # shorter than the window
    assert _reference_windows(1920, 2880, 1920, 1920, 960, 960) == [(0, 1920, 0, 1920), (0, 1920, 960, 2880)]
    assert _reference_windows(1920, 1920, 960, 960, 960, 960) == [
        (0, 960, 0, 960), (0, 960, 960, 1920), (960, 1920, 0, 960), (960, 1920, 960, 1920)]


def test_slide_inference_averages_overlapping_window_logits():
    from hrdecoder_jax.inference import inference

    h, w, crop, stride = 6, 9, (4, 4), (2, 3)
    # Pixel (y, x) holds y * 100 + x; the fake forward answers every window with its top-left pixel's
    # value (channel 0) and a constant 1 (channel 1), so the output is a per-pixel mean of window ids.
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    code = (yy * 100 + xx).astype(np.float32)
    images = jnp.asarray(np.repeat(code[None, :, :, None], 3, axis=-1))

    def fake_forward(crops):
        top_left = crops[:, :1, :1, :1]
        return jnp.concatenate([jnp.broadcast_to(top_left, crops.shape[:3] + (1,)),
                                jnp.ones(crops.shape[:3] + (1,))], axis=-1)

    got = np.asarray(inference(fake_forward, images, {"mode": "slide", "crop_size": crop, "stride": stride}))

    windows = list(_reference_windows(h, w, *crop, *stride))
    # rows: windows at y 0, 2 (the last shifted inward: 2); cols at x 0, 3, 5 (6 -> 5 shifted inward)
    assert windows == [(0, 4, 0, 4), (0, 4, 3, 7), (0, 4, 5, 9), (2, 6, 0, 4), (2, 6, 3, 7), (2, 6, 5, 9)]
    # columns 0-2: window x=0 only; 3: x=0 and x=3; 4: x=3 only; 5-6: x=3 and x=5; 7-8: x=5 only.
    # rows 0-1: window y=0; 2-3: y=0 and y=2; 4-5: y=2.
    row = [1, 1, 1, 2, 1, 2, 2, 1, 1]
    count = np.array([row, row, [2 * v for v in row], [2 * v for v in row], row, row], np.float32)
    total = np.zeros((h, w), np.float32)
    hand_count = np.zeros((h, w), np.float32)
    for y1, y2, x1, x2 in windows:
        total[y1:y2, x1:x2] += y1 * 100 + x1
        hand_count[y1:y2, x1:x2] += 1
    np.testing.assert_array_equal(hand_count, count)
    np.testing.assert_allclose(got[0, ..., 0], total / count, rtol=1e-6)
    np.testing.assert_allclose(got[0, ..., 1], 1.0)                    # an average, not a sum
    # Spot checks by hand: (0, 0) only window (0,0); (2, 3) in four windows; (0, 5) in windows x=3 and x=5.
    assert got[0, 0, 0, 0] == pytest.approx(0.0)
    assert got[0, 2, 3, 0] == pytest.approx((3 + 0 + 203 + 200) / 4)
    assert got[0, 0, 5, 0] == pytest.approx((3 + 5) / 2)


# ----------------------------------------------------------------------------------------------------------
# evaluate()
# ----------------------------------------------------------------------------------------------------------


def test_evaluate_streams_and_matches_direct_metrics(restored, tiny_config, tmp_path):
    from hrdecoder_jax.data import open_split
    from hrdecoder_jax.data.pipeline import make_eval_dataset
    from hrdecoder_jax.evaluation import evaluate
    from hrdecoder_jax.inference import inference, probabilities
    from hrdecoder_jax.metrics import lesion_metrics, trapezoid_auc
    from hrdecoder_jax.reports import write_outputs

    model, forward, _ = restored
    results = evaluate(model, tiny_config, progress=True, forward=forward)
    assert results["num_images"] == 2
    assert results["names"] == ["synthetic_test_0000", "synthetic_test_0001"]

    # The same probabilities computed directly, then the batch metric function.
    probs, labels = [], []
    for batch in make_eval_dataset(open_split(tiny_config.data, "test"), tiny_config.data):
        logits = inference(forward, jnp.asarray(batch["image"]), tiny_config.model.test_cfg)
        p = probabilities(logits, tuple(batch["orig_size"][0]))[0]
        probs.append(np.moveaxis(np.asarray(p), -1, 0))
        labels.append(batch["label"][0])
    direct = lesion_metrics(probs, labels, num_fine_thresholds=tiny_config.eval.num_fine_thresholds)
    for key in ("IoU", "F1", "PPV", "S", "AUPR", "MAE", "AUPR_fine"):
        np.testing.assert_array_equal(results[key], direct[key], err_msg=key)
        assert results["m" + key] == direct["m" + key] or np.isnan(direct["m" + key])
    for key in ("IoU", "F1", "MAE"):
        np.testing.assert_array_equal(results["per_image"][key], direct["per_image"][key])
    # The PR curve is the one the AUPR numbers integrate.
    for c in range(4):
        for curve, aupr in (("pr_curve", "AUPR_fine"), ("pr_curve_reference", "AUPR")):
            pr = results[curve]
            assert trapezoid_auc(pr["recall"][:, c], pr["precision"][:, c]) == pytest.approx(results[aupr][c])

    paths = write_outputs(results, str(tmp_path / "out"))
    doc = json.loads(pathlib.Path(paths["metrics.json"]).read_text())
    assert doc["num_images"] == 2 and doc["lesions"] == list(LESIONS)
    for c, lesion in enumerate(LESIONS):
        v = direct["IoU"][c]
        assert (doc["IoU"][lesion] is None) if np.isnan(v) else doc["IoU"][lesion] == pytest.approx(v, rel=1e-12)
    assert doc["mAUPR"] == pytest.approx(direct["mAUPR"], rel=1e-12)
    with open(paths["per_image.csv"]) as f:
        rows = list(csv.DictReader(f))
    assert [r["name"] for r in rows] == results["names"]
    assert set(rows[0]) == {"name"} | {f"{m}_{l}" for m in ("IoU", "F1", "MAE") for l in LESIONS}
    assert float(rows[1]["MAE_HE"]) == pytest.approx(direct["per_image"]["MAE"][1, 1], rel=1e-5)
    assert pathlib.Path(paths["pr_curves.png"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_evaluate_command_on_saved_checkpoint(workdir, tiny_config, capsys):
    from hrdecoder_jax import evaluate as evaluation

    assert evaluation.main(["--config", TINY, "--workdir", str(workdir), "--checkpoint", "latest",
                            f"--config.data.data_dir={tiny_config.data.data_dir}", "--config.eval.max_images=1",
                            "--noprogress"]) == 0
    out = capsys.readouterr().out
    assert "Class" in out and "mean" in out and "MAE(e-2)" in out
    out_dir = workdir / "eval_test_0"
    doc = json.loads((out_dir / "metrics.json").read_text())
    assert doc["num_images"] == 1
    assert (out_dir / "pr_curves.png").stat().st_size > 1000
    assert len((out_dir / "per_image.csv").read_text().strip().splitlines()) == 2

    assert evaluation.main(["--config", TINY, "--workdir", str(workdir), "--checkpoint", "7"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "no checkpoint for step 7" in err[0]


# ----------------------------------------------------------------------------------------------------------
# predict
# ----------------------------------------------------------------------------------------------------------


def test_predict_folder_of_mixed_images(restored, tiny_config, workdir, tmp_path):
    import tifffile
    from PIL import Image

    from hrdecoder_jax.data import generate_fundus
    from hrdecoder_jax.predict import main, predict_file, predict_paths

    _, forward, _ = restored
    src = tmp_path / "in"
    src.mkdir()
    sizes = {"a.png": (120, 180), "b.jpg": (300, 260), "c.tif": (96, 128)}
    for i, (name, (h, w)) in enumerate(sizes.items()):
        image, _ = generate_fundus(i, h, w)
        if name.endswith(".tif"):
            tifffile.imwrite(src / name, image.astype(np.uint16) * 257)     # a 16-bit TIFF
        else:
            Image.fromarray(image).save(src / name)
    (src / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (src / "notes.txt").write_text("ignored")

    out = tmp_path / "out"
    lines = []
    paths = sorted(str(p) for p in src.iterdir() if p.suffix != ".txt")
    done, skipped = predict_paths(forward, paths, tiny_config, str(out), log=lines.append)
    assert skipped == [str(src / "broken.png")]
    assert sorted(os.path.basename(p) for p in done) == sorted(sizes)
    assert any(line.startswith("skipped") and "broken.png" in line for line in lines)
    for name, (h, w) in sizes.items():
        stem = name.split(".")[0]
        for lesion in LESIONS:
            im = Image.open(out / f"{stem}_{lesion}.png")
            assert im.mode == "L" and im.size == (w, h)
        overlay = Image.open(out / f"{stem}_overlay.png")
        assert overlay.mode == "RGB" and overlay.size == (w, h)
    assert not (out / "broken_EX.png").exists()

    written = predict_file(forward, str(src / "b.jpg"), tiny_config, str(out / "npy"), save_npy=True)
    probs = np.load(written["probs"])
    assert probs.shape == (300, 260, 4) and probs.dtype == np.float32
    ex = np.asarray(Image.open(written["EX"]))
    np.testing.assert_array_equal(ex, np.round(255 * probs[..., 0]).astype(np.uint8))

    # The command: a folder with only the corrupt file processes nothing and fails; a good file succeeds.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jpg").write_bytes(b"garbage")
    common = ["--config", TINY, "--workdir", str(workdir), "--output", str(tmp_path / "cli")]
    assert main(common + ["--input", str(bad)]) == 1
    assert main(common + ["--input", str(src / "a.png"), "--save_npy"]) == 0
    assert (tmp_path / "cli" / "a_probs.npy").exists()


# ----------------------------------------------------------------------------------------------------------
# Notebook
# ----------------------------------------------------------------------------------------------------------


def test_inspect_notebook_runs(workdir, tmp_path):
    import nbformat

    notebook = REPO / "notebooks" / "inspect.ipynb"
    figure = tmp_path / "inspect.png"
    env = {"HRDECODER_CONFIG": TINY, "HRDECODER_WORKDIR": str(workdir), "HRDECODER_FIGURE": str(figure),
           "HRDECODER_REPO": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2", "MPLBACKEND": "Agg"}
    nb = nbformat.read(notebook, as_version=4)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)   # the kernel inherits the environment of this process
    try:
        try:
            import nbclient
            from jupyter_client.kernelspec import KernelSpecManager

            KernelSpecManager().get_kernel_spec("python3")
        except Exception:  # noqa: BLE001 - no kernel: run the code cells in a plain interpreter instead
            code = "\n\n".join(c.source for c in nb.cells if c.cell_type == "code")
            code = "\n".join(line for line in code.splitlines() if not line.lstrip().startswith(("%", "!")))
            subprocess.run([sys.executable, "-c", code], check=True, cwd=notebook.parent, timeout=300)
        else:
            nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                    resources={"metadata": {"path": str(notebook.parent)}}).execute()
            text = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
            assert "restored step 0" in text and "fused (output)" in text
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    assert figure.stat().st_size > 1000


def test_evaluate_prints_first_and_never_leaves_a_partial_file(trained, tmp_path, capsys, monkeypatch):
    root, _ = trained
    from hrdecoder_jax import evaluate
    args = [f"--config={cfg_with(tmp_path, root)}", f"--workdir={root / 'run'}", f"--output={tmp_path / 'e'}",
            "--noprogress"]
    assert evaluate.main(args) == 0
    first = (tmp_path / "e" / "metrics.json").read_text()
    doc = json.loads(first)
    assert (doc["step"], doc["checkpoint"], doc["workdir"]) == (4, str(root / "run" / "checkpoints" / "4"),
                                                                str(root / "run"))
    capsys.readouterr()

    def full_disk(obj, f, **kwargs):                          # the disk fills up halfway through metrics.json
        f.write(json.dumps(obj, **kwargs)[:100])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(json, "dump", full_disk)
    assert evaluate.main(args) == 1
    captured = capsys.readouterr()
    assert "Class" in captured.out and "mean" in captured.out          # the table came first
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: disk full (no space left on device): {tmp_path / 'e' / 'metrics.json'}"]
    assert (tmp_path / "e" / "metrics.json").read_text() == first     # the previous result, whole
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["metrics.json", "per_image.csv", "pr_curves.png"]
