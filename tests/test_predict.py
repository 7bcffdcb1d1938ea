"""The ``predict`` command: output names and inputs.
"""
import os
import pathlib

from helpers import cfg_with, one_error_line

REPO = pathlib.Path(__file__).resolve().parents[1]


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
