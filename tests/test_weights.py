"""Weight import (``weights``, the ``convert`` command): mmseg state_dicts load whatever their wrapping, and
foreign or broken ones are refused in one line.
"""
import os
import pathlib

import numpy as np
import pytest
from flax import nnx

from helpers import one_error_line
from hrdecoder_jax.models import build_model
from hrdecoder_jax.weights import WeightImportError, load_torch_weights, read_state_dict
from test_models import STATE_NPZ, STATE_PTH, tiny_config

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_convert_refuses_a_foreign_state_dict(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    from hrdecoder_jax import convert
    foreign = tmp_path / "foreign.npz"
    np.savez(foreign, **{"encoder.layer1.weight": np.zeros((3, 3), np.float32)})
    args = ["--config=configs/tiny.py", f"--torch_checkpoint={foreign}", f"--workdir={tmp_path / 'w'}"]
    assert convert.main(args) == 1
    line = one_error_line(capsys)
    assert "fills only 0 of the model's 277 tensors" in line and "--allow_partial" in line
    assert not (tmp_path / "w" / "checkpoints").exists()
    assert convert.main(args + ["--allow_partial"]) == 0


def test_convert_errors_are_one_line(fixtures_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    from hrdecoder_jax import convert
    good = fixtures_dir / "tiny_w18_256_hr128_seed0_state_dict.npz"
    bad_shape = tmp_path / "shape.npz"
    sd = dict(np.load(good))
    sd["decode_head.conv_seg.weight"] = np.zeros((5, 64, 1, 1), np.float32)
    np.savez(bad_shape, **sd)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint" * 10)
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:100000])
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    cases = [(bad_shape, tmp_path / "w1", "shape mismatch for decode_head.conv_seg.weight"),
             (garbage, tmp_path / "w2", "not a readable PyTorch checkpoint"),
             (truncated, tmp_path / "w3", "not a readable .npz"),
             (tmp_path / "missing.pth", tmp_path / "w4", "missing.pth"),
             (good, a_file / "sub", "not writable")]
    for source, work, expect in cases:
        assert convert.main(["--config=configs/tiny.py", f"--torch_checkpoint={source}", f"--workdir={work}"]) == 1
        assert expect in one_error_line(capsys), expect
    args = ["--config=configs/tiny.py", f"--torch_checkpoint={good}", f"--workdir={tmp_path / 'w5'}"]
    assert convert.main(args) == 0
    capsys.readouterr()
    assert convert.main(args) == 1                              # the step exists: a second convert
    assert "already exists" in one_error_line(capsys)


def test_convert_reads_checkpoints_with_numpy_values_in_their_meta(fixtures_dir, tmp_path, capsys, monkeypatch):
    """mmcv stores numpy scalars in ``meta`` (``evaluation=dict(save_best=...)``): read with weights_only,
    numpy's scalars and dtypes allowed, under numpy 2's and numpy 1's names; anything that runs code is
    still refused."""
    import zipfile

    import torch

    from hrdecoder_jax import convert
    monkeypatch.chdir(REPO)
    tensors = {k: torch.from_numpy(v) for k, v in np.load(fixtures_dir / "tiny_w18_256_hr128_seed0_state_dict.npz").items()}
    meta = {"iter": 20000, "mmcv_version": "1.7.1", "CLASSES": ("background", "EX", "HE", "SE", "MA"),
            "hook_msgs": {"best_score": np.float64(0.3781), "best_ckpt": "best_mIoU_iter_20000.pth",
                          "last_ckpt": "iter_20000.pth"}, "best_iter": np.int64(20000)}
    torch.save({"meta": meta, "state_dict": tensors, "optimizer": {"state": {}, "param_groups": [{"lr": 0.01}]}},
               tmp_path / "mmcv.pth")
    old = tmp_path / "mmcv_numpy1.pth"                       # as numpy 1 pickles its scalars
    with zipfile.ZipFile(tmp_path / "mmcv.pth") as src, zipfile.ZipFile(old, "w", zipfile.ZIP_STORED) as dst:
        for info in src.infolist():
            data = src.read(info.filename)
            if info.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray\nscalar" in data
                data = data.replace(b"numpy._core.multiarray\nscalar", b"numpy.core.multiarray\nscalar")
            dst.writestr(info, data)
    for source in (tmp_path / "mmcv.pth", old):
        assert convert.main(["--config=configs/tiny.py", f"--torch_checkpoint={source}",
                             f"--workdir={tmp_path / source.stem}"]) == 0, capsys.readouterr().err
        assert "loaded 277 tensors" in capsys.readouterr().out

    class RunsCode:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"meta": {"hook": RunsCode()}, "state_dict": tensors}, tmp_path / "code.pth")
    assert convert.main(["--config=configs/tiny.py", f"--torch_checkpoint={tmp_path / 'code.pth'}",
                         f"--workdir={tmp_path / 'code'}"]) == 1
    assert "not a readable PyTorch checkpoint" in one_error_line(capsys)


def test_weights_load_from_pth_and_npz_identically(fixtures_dir):
    pytest.importorskip("torch")
    a, b = read_state_dict(fixtures_dir / STATE_PTH), read_state_dict(fixtures_dir / STATE_NPZ)
    assert a.keys() == b.keys()
    model = build_model(tiny_config(), rngs=nnx.Rngs(1))
    report = load_torch_weights(model, fixtures_dir / STATE_PTH)
    assert report.missing == [] and report.unexpected == []
    assert all(k.endswith("num_batches_tracked") for k in report.ignored) and len(report.ignored) == 55
    assert len(report.loaded) == 277


def test_wrapped_prefixed_and_bare_backbone_checkpoints(fixtures_dir):
    sd = read_state_dict(fixtures_dir / STATE_NPZ)
    wrapped = {"state_dict": {"module." + k: v for k, v in sd.items()}, "meta": {}}
    model = build_model(tiny_config(), rngs=nnx.Rngs(1))
    report = load_torch_weights(model, wrapped)
    assert not report.missing and not report.unexpected
    # An ImageNet HRNet checkpoint: backbone keys without prefix plus classification layers.
    bare = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    bare["classifier.weight"] = np.zeros((1000, 2048), np.float32)
    bare["incre_modules.0.0.conv1.weight"] = np.zeros((32, 18, 1, 1), np.float32)
    report = load_torch_weights(build_model(tiny_config(), rngs=nnx.Rngs(2)), bare)
    assert report.unexpected == []
    assert "classifier.weight" in report.ignored and "incre_modules.0.0.conv1.weight" in report.ignored
    assert report.missing and all(k.startswith("decode_head.") for k in report.missing)


def test_wrong_key_and_shape_are_reported(fixtures_dir):
    sd = read_state_dict(fixtures_dir / STATE_NPZ)
    renamed = dict(sd)
    renamed["decode_head.conv_segX.weight"] = renamed.pop("decode_head.conv_seg.weight")
    report = load_torch_weights(build_model(tiny_config(), rngs=nnx.Rngs(0)), renamed)
    assert report.missing == ["decode_head.conv_seg.weight"]
    assert report.unexpected == ["decode_head.conv_segX.weight"]
    assert "decode_head.conv_seg.weight" in report.summary()
    bad = dict(sd)
    bad["decode_head.conv_seg.weight"] = np.zeros((5, 64, 1, 1), np.float32)
    with pytest.raises(WeightImportError, match=r"decode_head\.conv_seg\.weight.*\(5, 64, 1, 1\).*\(4, 64, 1, 1\)"):
        load_torch_weights(build_model(tiny_config(), rngs=nnx.Rngs(0)), bad)
