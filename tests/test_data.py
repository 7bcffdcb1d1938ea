"""Dataset builders: synthetic generator, idrid/ddr from generated files in every accepted layout, bad input."""
import io
import json
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import hrdecoder_jax.data as D
from helpers import one_error_line
from hrdecoder_jax.data import manual as M
from hrdecoder_jax.tools.write_layout import main as write_layout_main, write_layout
from hrdecoder_jax.train import train_and_evaluate
from test_train import shrunk_synthetic_config

REPO = pathlib.Path(__file__).resolve().parents[1]

H, W = 64, 96
SEED = 7


@pytest.fixture(autouse=True, scope="module")
def _quiet():
    tfds.disable_progress_bar()


def _load(name, split, data_dir, manual_dir=None, **kw):
    ds = D.load_split(name, split, data_dir=data_dir, manual_dir=manual_dir, **kw)
    return {ex["name"].decode(): ex for ex in ds.as_numpy_iterator()}


def _read_written(manual: pathlib.Path, rel: str) -> bytes:
    zips = list(manual.glob("*.zip"))
    if zips:
        with zipfile.ZipFile(zips[0]) as z:
            return z.read(rel)
    return (manual / rel).read_bytes()


def _check_dataset(name, written, data_dir, manual, file_root=None):
    """Counts, shapes, masks pixel-exact, images equal to the decoded JPEG (and close to the original)."""
    file_root = manual if file_root is None else file_root
    splits = sorted({w.split for w in written})
    loaded = {s: _load(name, s, data_dir, manual) for s in splits}
    for s in splits:
        assert D.num_examples(name, s, data_dir=data_dir, manual_dir=manual) == sum(w.split == s for w in written)
    for w in written:
        ex = loaded[w.split][w.name]
        assert ex["image"].shape == (H, W, 3) and ex["image"].dtype == np.uint8
        assert ex["masks"].shape == (H, W, 4) and ex["masks"].dtype == np.uint8
        image, masks = w.generated()
        np.testing.assert_array_equal(ex["masks"], w.expected_masks(masks), err_msg=w.name)
        jpeg = np.asarray(Image.open(io.BytesIO(_read_written(file_root, w.image_path))).convert("RGB"))
        # Stored as the original JPEG bytes and decoded with the accurate DCT: identical to Pillow / cv2.
        np.testing.assert_array_equal(ex["image"], jpeg, err_msg=w.name)
        assert np.abs(ex["image"].astype(int) - image).mean() < 6, w.name
    return loaded


# ------------------------------------------------------------------------------------- synthetic


def test_generate_fundus_deterministic_and_plausible():
    a_img, a_m = D.generate_fundus(3, H, W)
    b_img, b_m = D.generate_fundus(3, H, W)
    c_img, c_m = D.generate_fundus(4, H, W)
    assert a_img.shape == (H, W, 3) and a_img.dtype == np.uint8
    assert a_m.shape == (H, W, 4) and a_m.dtype == np.uint8
    assert a_img.tobytes() == b_img.tobytes() and a_m.tobytes() == b_m.tobytes()
    assert a_img.tobytes() != c_img.tobytes()
    assert set(np.unique(a_m)) <= {0, 1}
    assert (a_m.reshape(-1, 4).sum(0) > 0).all(), "every lesion type present"
    assert a_img[0, 0].max() < 20 and a_m[0, 0].sum() == 0, "dark border, no lesions outside the field of view"
    centre = a_img[H // 2 - 8:H // 2 + 8, W // 2 - 8:W // 2 + 8].reshape(-1, 3).mean(0)
    assert centre[0] > centre[1] > centre[2], "reddish-orange fundus"


def test_generate_fundus_lesion_appearance():
    img, m = D.generate_fundus(11, 512, 512)
    img = img.astype(float)
    lum = img.mean(-1)
    bg = lum[m.max(-1) == 0].mean()
    ex, he, se, ma = (m[..., i].astype(bool) for i in range(4))
    assert lum[ex].mean() > bg and lum[se].mean() > bg, "exudates are bright"
    assert lum[he].mean() < bg and lum[ma].mean() < bg, "haemorrhages and microaneurysms are dark"
    assert ma.sum() < he.sum(), "microaneurysms are tiny"


def test_synthetic_builder_matches_generator(tmp_path):
    cfg = D.synthetic_config(H, W, num_train=2, num_test=1, seed=SEED)
    assert D.num_examples("synthetic_fundus", "train", data_dir=tmp_path, config=cfg) == 2
    for split, n in (("train", 2), ("test", 1)):
        got = _load("synthetic_fundus", split, tmp_path, config=cfg)
        assert len(got) == n
        for i in range(n):
            ex = got[f"synthetic_{split}_{i:04d}"]
            img, m = D.generate_fundus(D.example_seed(SEED, split, i), H, W)
            np.testing.assert_array_equal(ex["image"], img)  # PNG: lossless
            np.testing.assert_array_equal(ex["masks"], m)
    other = _load("synthetic_fundus", "test", tmp_path, config=D.synthetic_config(H, W, 2, 1, seed=SEED + 1))
    assert other["synthetic_test_0000"]["image"].tobytes() != got["synthetic_test_0000"]["image"].tobytes()
    assert {c.name for c in D.SyntheticFundus.BUILDER_CONFIGS} >= {"default", "tiny"}
    assert D.num_examples("synthetic_fundus", "test", data_dir=tmp_path, config="tiny") == 2


# ----------------------------------------------------------------------------------------- IDRiD


def test_idrid_official_folder_nested(tmp_path, caplog):
    manual = tmp_path / "manual"
    written = write_layout(manual / "download", "idrid", num_train=3, num_test=2, height=H, width=W, seed=SEED)
    assert Image.open(manual / "download/A. Segmentation/2. All Segmentation Groundtruths/a. Training Set/"
                               "3. Hard Exudates/IDRiD_01_EX.tif").mode == "RGBA"
    assert [w.name for w in written if w.missing] == ["IDRiD_02", "IDRiD_05"]
    with caplog.at_level(logging.WARNING, logger="hrdecoder_jax.data"):
        _check_dataset("idrid", written, tmp_path / "data", manual, file_root=manual / "download")
    assert "IDRiD_02 SE" in caplog.text and "IDRiD_05 SE" in caplog.text


def test_idrid_official_zip(tmp_path):
    manual = tmp_path / "manual"
    written = write_layout(manual, "idrid", num_train=2, num_test=2, height=H, width=W, seed=SEED, as_zip=True)
    assert [p.name for p in manual.iterdir()] == ["A. Segmentation.zip"]
    _check_dataset("idrid", written, tmp_path / "data", manual)


@pytest.mark.parametrize("layout", ["mmseg", "mmseg-png"])
def test_idrid_mmseg_layouts(tmp_path, layout):
    manual = tmp_path / "manual"
    written = write_layout(manual, layout, num_train=3, num_test=2, height=H, width=W, seed=SEED)
    _check_dataset("idrid", written, tmp_path / "data", manual)


# ------------------------------------------------------------------------------------------- DDR


def test_ddr_official(tmp_path):
    manual = tmp_path / "manual"
    written = write_layout(manual, "ddr", num_train=2, num_valid=2, num_test=2, height=H, width=W, seed=SEED)
    loaded = _check_dataset("ddr", written, tmp_path / "data", manual)
    assert set(loaded) == {"train", "valid", "test"}


def test_ddr_folder_name_variants(tmp_path):
    manual = tmp_path / "manual"
    written = write_layout(manual / "DDR-dataset", "ddr", num_train=2, num_valid=1, num_test=1, height=H, width=W,
                             seed=SEED)
    root = manual / "DDR-dataset" / "lesion_segmentation"
    (root / "valid").rename(root / "val")
    (root / "train" / "image").rename(root / "train" / "Images")
    (root / "test" / "label").rename(root / "test" / "labels")
    (root / "test" / "labels" / "EX").rename(root / "test" / "labels" / "ex")
    (root / "val" / "image").rename(root / "val" / "img")
    got = {s: _load("ddr", s, tmp_path / "data", manual) for s in ("train", "valid", "test")}
    assert [len(got[s]) for s in ("train", "valid", "test")] == [2, 1, 1]
    for w in written:
        np.testing.assert_array_equal(got[w.split][w.name]["masks"], w.expected_masks())


def test_write_layout_command(tmp_path, capsys):
    assert write_layout_main(["--layout", "ddr", "--out", str(tmp_path), "--num-train", "1", "--num-valid", "1",
                              "--num-test", "1", "--height", "32", "--width", "48", "--zip"]) == 0
    assert "wrote 3 ddr images" in capsys.readouterr().out
    with zipfile.ZipFile(tmp_path / "lesion_segmentation.zip") as z:
        names = z.namelist()
    assert "lesion_segmentation/valid/label/MA/007-0002-100.tif" in names


# ------------------------------------------------------------------------------------- bad input


def _official(tmp_path, **kw):
    manual = tmp_path / "manual"
    write_layout(manual, "idrid", num_train=1, num_test=1, height=32, width=48, seed=1, **kw)
    return manual, manual / "A. Segmentation"


def _truncate(path: pathlib.Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _case_corrupt_jpeg(tmp_path):
    manual, root = _official(tmp_path)
    (root / "1. Original Images/a. Training Set/IDRiD_01.jpg").write_bytes(b"\xff\xd8 this is not a jpeg" * 8)
    return manual, "IDRiD_01.jpg"


def _case_truncated_jpeg(tmp_path):
    manual, root = _official(tmp_path)
    _truncate(root / "1. Original Images/b. Testing Set/IDRiD_02.jpg")
    return manual, "IDRiD_02.jpg: corrupt or truncated image"


def _case_truncated_tiff(tmp_path):
    manual, root = _official(tmp_path)
    _truncate(root / "2. All Segmentation Groundtruths/a. Training Set/2. Haemorrhages/IDRiD_01_HE.tif")
    return manual, "IDRiD_01_HE.tif: corrupt or truncated mask"


def _case_mask_size(tmp_path):
    manual, root = _official(tmp_path)
    Image.new("L", (40, 30)).save(root / "2. All Segmentation Groundtruths/b. Testing Set/1. Microaneurysms/IDRiD_02_MA.tif")
    return manual, "IDRiD_02_MA.tif: mask is 40x30 (WxH) but its image IDRiD_02.jpg is 48x32"


def _case_empty_dir(tmp_path):
    (tmp_path / "manual").mkdir()
    return tmp_path / "manual", f"manual directory {tmp_path / 'manual'} is empty"


def _case_missing_dir(tmp_path):
    return tmp_path / "nowhere", f"manual directory {tmp_path / 'nowhere'} does not exist"


def _case_wrong_layout(tmp_path):
    (tmp_path / "manual/photos").mkdir(parents=True)
    (tmp_path / "manual/photos/IDRiD_01.jpg").write_bytes(b"x")
    return tmp_path / "manual", f"no dataset layout found in {tmp_path / 'manual'}"


def _case_missing_split(tmp_path):
    manual, root = _official(tmp_path)
    shutil.rmtree(root / "1. Original Images/b. Testing Set")
    return manual, "split 'test' missing"


def _case_bad_fused_values(tmp_path):
    manual = tmp_path / "manual"
    write_layout(manual, "mmseg-png", num_train=1, num_test=1, height=32, width=48, seed=1)
    Image.fromarray(np.full((32, 48), 7, np.uint8)).save(manual / "labels/train/IDRiD_01.png")
    return manual, "IDRiD_01.png: label values [7] outside 0..4"


def _case_corrupt_zip(tmp_path):
    (tmp_path / "manual").mkdir()
    (tmp_path / "manual/A. Segmentation.zip").write_bytes(b"PK\x03\x04 truncated")
    return tmp_path / "manual", "A. Segmentation.zip is not a readable zip archive"


@pytest.mark.parametrize("case", [
    _case_corrupt_jpeg, _case_truncated_jpeg, _case_truncated_tiff, _case_mask_size, _case_empty_dir,
    _case_missing_dir, _case_wrong_layout, _case_missing_split, _case_bad_fused_values,
    _case_corrupt_zip,
], ids=lambda f: f.__name__[6:])
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_bad_input_one_line_error(tmp_path, case):
    manual, expected = case(tmp_path)
    with pytest.raises(D.DatasetError) as e:
        D.load_split("idrid", "train", data_dir=tmp_path / "data", manual_dir=manual)
    msg = str(e.value)
    assert "\n" not in msg
    assert expected in msg


def test_missing_lesion_folder_is_a_logged_missing_mask(tmp_path, caplog):
    manual = tmp_path / "manual"
    write_layout(manual, "idrid", num_train=1, num_test=1, height=32, width=48, seed=1)
    # The only test image (IDRiD_02) has no SE mask, so the folder does not exist, as in a zip.
    assert not (manual / "A. Segmentation/2. All Segmentation Groundtruths/b. Testing Set/4. Soft Exudates").exists()
    with caplog.at_level(logging.WARNING, logger="hrdecoder_jax.data"):
        got = _load("idrid", "test", tmp_path / "data", manual)
    assert got["IDRiD_02"]["masks"][..., 2].sum() == 0
    assert "no SE folder in" in caplog.text and "IDRiD_02 SE" in caplog.text


def test_missing_split_request(tmp_path):
    manual = tmp_path / "manual"
    write_layout(manual, "idrid", num_train=1, num_test=1, height=32, width=48, seed=1)
    with pytest.raises(D.DatasetNotFoundError, match=r"^idrid: no split 'valid' .*available: test, train"):
        D.load_split("idrid", "valid", data_dir=tmp_path / "data", manual_dir=manual)


def test_mask_decoding_variants():
    m = np.zeros((5, 6), bool)
    m[1:3, 2:5] = True
    u = m.astype(np.uint8)

    def enc(arr, mode=None, fmt="TIFF"):
        buf = io.BytesIO()
        Image.fromarray(arr, mode).save(buf, format=fmt) if mode else Image.fromarray(arr).save(buf, format=fmt)
        return buf.getvalue()

    rgb = np.stack([u * 255, 0 * u, 0 * u], -1)
    rgba = np.concatenate([rgb, np.full_like(u, 255)[..., None]], -1)
    for data in (enc(u * 255), enc(u * 76), enc(rgb), enc(rgba), enc(u * 255, fmt="PNG"), enc(m, fmt="PNG"),
                 enc(u.astype(np.uint16) * np.uint16(1000))):
        np.testing.assert_array_equal(M.decode_mask(data, "x"), m)
    fused = np.array([[0, 1, 2, 3, 4]], np.uint8)
    np.testing.assert_array_equal(M.decode_fused(enc(fused, fmt="PNG"), "x")[0], np.eye(5, dtype=np.uint8)[:, 1:])


def test_mask_drawn_in_the_alpha_channel_is_used_and_reported(caplog):
    from PIL import Image

    from hrdecoder_jax.data import manual
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[5:9, 10:14, 3] = 255                                  # black RGB, lesion in alpha only
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    with caplog.at_level(logging.WARNING, logger="hrdecoder_jax.data"):
        mask = manual.decode_mask(buf.getvalue(), "IDRiD_01_EX.png")
    assert mask.sum() == 16 and mask[5:9, 10:14].all()
    assert "IDRiD_01_EX.png" in caplog.text and "alpha" in caplog.text
    opaque = rgba.copy()
    opaque[..., 3] = 255                                        # IDRiD's own RGBA: opaque, lesion in red
    opaque[2:4, 2:4, 0] = 255
    buf = io.BytesIO()
    Image.fromarray(opaque, "RGBA").save(buf, format="PNG")
    assert manual.decode_mask(buf.getvalue(), "x.png").sum() == 4


def test_a_changed_manual_dir_is_refused(tmp_path):
    from hrdecoder_jax.data import DatasetError, get_builder
    from hrdecoder_jax.tools.write_layout import write_layout
    first, second = tmp_path / "first", tmp_path / "second"
    for where, seed in ((first, 0), (second, 1)):
        write_layout(str(where), "mmseg-png", num_train=1, num_test=1, height=32, width=48, seed=seed)
    get_builder("idrid", data_dir=tmp_path / "tfds", manual_dir=first)
    get_builder("idrid", data_dir=tmp_path / "tfds", manual_dir=first)          # the same: fine
    with pytest.raises(DatasetError, match="was prepared from .*first, not from manual_dir=.*second"):
        get_builder("idrid", data_dir=tmp_path / "tfds", manual_dir=second)


def test_a_file_cache_is_never_read_by_a_run_on_other_data(tmp_path):
    cache = tmp_path / "cache"

    def first_loss(seed: int) -> float:
        config = shrunk_synthetic_config(tmp_path / "data", total_steps=1)
        config.eval_every = 0
        config.data.synthetic.seed = seed
        config.data.cache = str(cache)
        return train_and_evaluate(config, str(tmp_path / f"w{seed}"), final_eval=False)["train"]["total"]

    assert first_loss(0) != first_loss(1)            # the second dataset's images, not the first's cached ones
    held = [json.loads(m.read_text()) for m in sorted(cache.glob("*/_COMPLETE"))]
    assert len(held) == 2 and held[0]["holds"] != held[1]["holds"]
    assert all("synthetic_fundus" in h["holds"] and h["num_examples"] == 6 for h in held)


def test_a_16_bit_grey_image_is_decoded_alike_by_the_datasets_and_predict(tmp_path):
    from PIL import Image

    from hrdecoder_jax.data import load_split, manual
    from hrdecoder_jax.predict import read_image
    from hrdecoder_jax.tools.write_layout import write_layout
    grey = np.linspace(0, 65535, 32 * 48).reshape(32, 48).astype(np.uint16)
    path = tmp_path / "g.png"
    Image.fromarray(grey).save(path)
    assert Image.open(path).mode == "I;16"
    rgb, _ = manual.decode_image(path.read_bytes(), str(path))
    np.testing.assert_array_equal(rgb, read_image(str(path)))
    np.testing.assert_array_equal(rgb[..., 0], np.round(grey / 257.0).astype(np.uint8))   # 0..65535 -> 0..255
    # Through a prepared dataset: the builder stores what the decoder gives, not an all-white image.
    manual_dir = tmp_path / "manual"
    write_layout(manual_dir, "mmseg-png", num_train=1, num_test=1, height=32, width=48, seed=0)
    (manual_dir / "images" / "train" / "IDRiD_01.jpg").unlink()
    shutil.copy(path, manual_dir / "images" / "train" / "IDRiD_01.png")
    ex = next(load_split("idrid", "train", data_dir=tmp_path / "tfds", manual_dir=manual_dir).as_numpy_iterator())
    np.testing.assert_array_equal(ex["image"], rgb)


def test_a_dataset_is_prepared_once_while_another_process_waits(tmp_path):
    """A process asking for a dataset that another one is preparing (it holds the preparation lock) waits,
    prepares nothing, and reads what the first one prepared."""
    import fcntl

    import tensorflow_datasets as tfds

    from hrdecoder_jax.data import synthetic_config
    builder = tfds.builder("synthetic_fundus", data_dir=str(tmp_path), config=synthetic_config(32, 48, 2, 1, seed=3))
    folder = pathlib.Path(builder.data_dir)
    folder.parent.mkdir(parents=True)
    fd = os.open(folder.parent / f".{folder.name}.prepare.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)                          # this process is "preparing"
    script = ("from hrdecoder_jax.data import get_builder, synthetic_config\n"
              f"b = get_builder('synthetic_fundus', data_dir={str(tmp_path)!r}, "
              "config=synthetic_config(32, 48, 2, 1, seed=3))\n"
              "print('examples', b.info.splits['train'].num_examples)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stderr:
            if "waiting: another process is preparing synthetic_fundus" in line:
                break
        assert not builder.is_prepared()                    # it waits instead of preparing too
        builder.download_and_prepare()
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0 and "examples 2" in out


def test_an_image_without_any_mask_is_refused(tmp_path):
    """All four masks of an image missing: it is not annotated (mmseg and nnU-Net need a label for every
    image), so it would enter the test set as lesion-free; refused, naming it."""
    from hrdecoder_jax.data import DatasetError, load_split
    from hrdecoder_jax.tools.write_layout import write_layout
    manual_dir = tmp_path / "manual"
    write_layout(manual_dir, "mmseg", num_train=1, num_test=2, height=32, width=48, seed=0)
    for mask in (manual_dir / "labels" / "test").rglob("IDRiD_03_*.tif"):
        mask.unlink()
    with pytest.raises(DatasetError, match=r"idrid/test: 1 image\(s\) in .*images/test have no mask at all in "
                                           r".*labels/test \(IDRiD_03\)"):
        load_split("idrid", "test", data_dir=tmp_path / "tfds", manual_dir=manual_dir)


def test_write_layout_never_writes_into_an_existing_dataset(tmp_path, capsys):
    from hrdecoder_jax.tools import write_layout as tool
    main, write_layout = tool.main, tool.write_layout
    real = tmp_path / "download"
    (real / "images" / "train").mkdir(parents=True)
    photo = real / "images" / "train" / "IDRiD_01.jpg"
    photo.write_bytes(b"a real photograph")
    small = ["--num-train", "1", "--num-test", "1", "--height", "32", "--width", "48"]
    assert main(["--layout", "mmseg", "--out", str(real), *small]) == 1
    line = one_error_line(capsys)
    assert f"--out {real} is not empty (images)" in line and "mix two datasets" in line
    assert photo.read_bytes() == b"a real photograph"
    assert sorted(str(p.relative_to(real)) for p in real.rglob("*")) == ["images", "images/train",
                                                                        "images/train/IDRiD_01.jpg"]
    with pytest.raises(ValueError, match="is not empty"):        # write_layout.LayoutError
        write_layout(real, "mmseg", num_train=1, num_test=1, height=32, width=48)
    assert main(["--layout", "mmseg", "--out", str(tmp_path / "new"), *small]) == 0
