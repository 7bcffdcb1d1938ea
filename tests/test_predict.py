"""The ``predict`` command: its output names and inputs, and real fundus photographs through it: scikit-image's public-domain retina (1411 x 1411 RGB, saved as
JPEG and as PNG) and its microaneurysm crop (102 x 102, greyscale). Both ship inside the scikit-image wheel;
nothing is downloaded (checked: the network is unavailable while they load).

The model is the tiny config with the reference's weights: what it predicts on a real photograph means
nothing; what is tested is that a real photograph of either format runs end to end and gives maps of its
own size, the same maps ``predict_probabilities`` gives for the decoded pixels.
"""
import os
import pathlib
import socket

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from helpers import cfg_with, one_error_line
from hrdecoder_jax import LESIONS, checkpoint, cli
from hrdecoder_jax.models import build_model

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.py")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """The two photographs, loaded with the network switched off, written as the files a user would have."""
    skdata = pytest.importorskip("skimage.data")          # the test extra; CI installs it

    def no_network(*args, **kwargs):
        raise OSError("network access attempted while loading scikit-image's bundled photographs")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket, "socket", no_network)
        mp.setattr(socket, "create_connection", no_network)
        retina, crop = skdata.retina(), skdata.microaneurysms()
    assert retina.shape == (1411, 1411, 3) and retina.dtype == np.uint8
    assert crop.shape == (102, 102) and crop.dtype == np.uint8
    folder = tmp_path_factory.mktemp("photos")
    # Distinct stems: predict names its outputs after the file's stem.
    Image.fromarray(retina).save(folder / "retina_jpeg.jpg", quality=95)
    Image.fromarray(retina).save(folder / "retina_png.png")
    Image.fromarray(crop).save(folder / "microaneurysms.png")
    return folder, {"retina": retina, "microaneurysms": crop}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, fixtures_dir):
    from hrdecoder_jax.weights import load_torch_weights

    config = cli.load_config(TINY)
    model = nnx.eval_shape(lambda: build_model(config.model, rngs=nnx.Rngs(0)))
    nnx.update(model, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nnx.state(model)))
    assert not load_torch_weights(model, fixtures_dir / "tiny_w18_256_hr128_seed0_state_dict.npz").missing
    path = tmp_path_factory.mktemp("converted")
    checkpoint.save_model(str(path), model, config=config, source="fixture")
    return path


def test_predict_runs_on_real_photographs(photos, workdir, tmp_path):
    from hrdecoder_jax.inference import make_forward
    from hrdecoder_jax.predict import main, predict_file, read_image

    folder, arrays = photos
    out = tmp_path / "out"
    # The command, on the folder of the three files.
    assert main(["--config", TINY, "--workdir", str(workdir), "--input", str(folder), "--output", str(out)]) == 0
    assert len([n for n in out.iterdir() if n.name.endswith("overlay.png")]) == 3

    # Each file, with what it wrote.
    config = cli.load_config(TINY)
    model, _ = checkpoint.restore_for_inference(config, str(workdir), "latest")
    forward = make_forward(model)
    probs = {}
    for name, (h, w) in (("retina_jpeg.jpg", (1411, 1411)), ("retina_png.png", (1411, 1411)),
                         ("microaneurysms.png", (102, 102))):
        written = predict_file(forward, str(folder / name), config, str(tmp_path / name), save_npy=True)
        for lesion in LESIONS:
            with Image.open(written[lesion]) as im:
                assert im.mode == "L" and im.size == (w, h)
        with Image.open(written["overlay"]) as im:
            assert im.mode == "RGB" and im.size == (w, h)
        p = np.load(written["probs"])
        assert p.shape == (h, w, 4) and p.dtype == np.float32 and np.isfinite(p).all()
        assert 0.0 <= p.min() and p.max() <= 1.0
        probs[name] = p
    # The PNGs are lossless: predict read scikit-image's very pixels (the crop as grey -> RGB).
    np.testing.assert_array_equal(read_image(str(folder / "retina_png.png")), arrays["retina"])
    np.testing.assert_array_equal(read_image(str(folder / "microaneurysms.png")),
                                  np.repeat(arrays["microaneurysms"][..., None], 3, axis=-1))
    # JPEG at quality 95 moves pixels by a few levels; its maps stay close to the lossless file's.
    assert np.abs(probs["retina_jpeg.jpg"] - probs["retina_png.png"]).mean() < 0.01


def test_predict_names_never_collide_and_outputs_are_never_inputs(trained, tmp_path, capsys):
    from PIL import Image

    from hrdecoder_jax import LESIONS, predict
    from hrdecoder_jax.data import generate_fundus
    root, _ = trained
    cfg = cfg_with(tmp_path, root)
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.fromarray(generate_fundus(1, 64, 64)[0]).save(photos / "a.jpg")
    Image.fromarray(generate_fundus(2, 64, 64)[0]).save(photos / "a.png")
    os.symlink(tmp_path / "nowhere.jpg", photos / "gone.jpg")
    args = [f"--config={cfg}", f"--workdir={root / 'run'}", f"--input={photos}", f"--output={photos}"]
    assert predict.main(args) == 0
    captured = capsys.readouterr()
    outputs = sorted(f"a.{ext}_{kind}.png" for ext in ("jpg", "png") for kind in (*LESIONS, "overlay"))
    names = sorted(["a.jpg", "a.png", "gone.jpg", "predictions.json", *outputs])
    assert sorted(p.name for p in photos.iterdir()) == names
    assert "wrote predictions of 2 file(s)" in captured.out
    assert f"skipped {photos / 'gone.jpg'}: " in captured.err and "broken symbolic link" in captured.err
    # Again into the same folder: the same two photos, not the 10 outputs of the first run.
    assert predict.main(args) == 0
    captured = capsys.readouterr()
    assert "wrote predictions of 2 file(s)" in captured.out and "left out 10 output file(s)" in captured.err
    assert sorted(p.name for p in photos.iterdir()) == names
    # An output named like an input would overwrite it: refused before anything runs.
    clash = tmp_path / "clash"
    clash.mkdir()
    Image.fromarray(generate_fundus(3, 64, 64)[0]).save(clash / "b.png")
    Image.fromarray(generate_fundus(4, 64, 64)[0]).save(clash / "b_EX.png")
    assert predict.main([f"--config={cfg}", f"--workdir={root / 'run'}", f"--input={clash}",
                         f"--output={clash}"]) == 1
    assert "would overwrite the input" in one_error_line(capsys)
    assert sorted(p.name for p in clash.iterdir()) == ["b.png", "b_EX.png"]
