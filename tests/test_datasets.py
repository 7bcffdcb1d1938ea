"""Dataset builders: synthetic generator, idrid/ddr from generated files in every accepted layout, bad input."""
import io
import logging
import pathlib
import shutil
import zipfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

import hrdecoder_jax.data as D
from hrdecoder_jax.data import manual as M
from hrdecoder_jax.tools.write_layout import main as write_layout_main, write_layout

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
