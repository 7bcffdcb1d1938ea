"""export: StableHLO and ONNX artifacts of a checkpoint, the JAX-only loader, the manifest, one-line errors.

The model is the tiny config with the reference's weights (a model-only checkpoint, as ``convert`` writes)
and a test_cfg that exercises every test-time step: slide windows of 128 with stride 64 on the 256 x 256
test scale (9 windows), Gaussian weighting and flip TTA.
"""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hrdecoder_jax import LESIONS, checkpoint, cli, deploy, serving
from hrdecoder_jax.models import build_model

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.py")
TEST_CFG = ["--config.model.test_cfg.mode=slide", "--config.model.test_cfg.crop_size=(128, 128)",
            "--config.model.test_cfg.stride=(64, 64)", "--config.model.test_cfg.weighting=gaussian",
            "--config.model.test_cfg.flip=True"]


@pytest.fixture(scope="module")
def config():
    return cli.load_config(TINY, TEST_CFG)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory, fixtures_dir, config):
    """A model-only checkpoint of the reference weights of the tiny model."""
    from hrdecoder_jax.weights import load_torch_weights

    model = nnx.eval_shape(lambda: build_model(config.model, rngs=nnx.Rngs(0)))
    nnx.update(model, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nnx.state(model)))
    report = load_torch_weights(model, fixtures_dir / "tiny_w18_256_hr128_seed0_state_dict.npz")
    assert not report.missing, report.summary()
    path = tmp_path_factory.mktemp("converted")
    checkpoint.save_model(str(path), model, config=config, source="fixture")
    return path


@pytest.fixture(scope="module")
def restored(workdir, config):
    from hrdecoder_jax.inference import make_forward

    model, _ = checkpoint.restore_for_inference(config, str(workdir), "latest")
    return model, make_forward(model)


# The `onnx` extra (jax2onnx, onnx, onnxruntime); CI installs it. Without it the ONNX test says it was skipped.
HAVE_ONNX = all(importlib.util.find_spec(m) is not None for m in ("jax2onnx", "onnx", "onnxruntime"))


@pytest.fixture(scope="module")
def exported(workdir, tmp_path_factory):
    """One export command writing both formats (StableHLO alone without the `onnx` extra)."""
    from hrdecoder_jax import export

    out = tmp_path_factory.mktemp("exports") / "tiny"
    assert export.main(["--config", TINY, *TEST_CFG, "--workdir", str(workdir), "--checkpoint", "latest",
                        "--format", "stablehlo,onnx" if HAVE_ONNX else "stablehlo", "--output", str(out)]) == 0
    return out


def photo(h=200, w=310, seed=5):
    """A synthetic fundus photograph of a size unlike the test scale (both axes resized, one up, one down)."""
    from hrdecoder_jax.data import generate_fundus
    return generate_fundus(seed, h, w)[0]


def test_manifest(exported, config):
    doc = json.loads((exported / "manifest.json").read_text())
    onnx = ["model.onnx"] if HAVE_ONNX else []
    assert sorted(os.listdir(exported)) == sorted(["manifest.json", "model.stablehlo", *onnx])
    assert doc["artifacts"] == {"stablehlo": "model.stablehlo", **({"onnx": "model.onnx"} if onnx else {})}
    assert doc["config"]["name"] == "tiny.py" and doc["config"]["digest"] == "sha256:" + deploy.config_digest(config)
    assert doc["checkpoint"] == {"which": "latest", "step": 0}
    assert doc["lesions"] == list(LESIONS) and doc["layout"] == "NHWC"
    assert doc["input"]["dtype"] == "uint8" and doc["input"]["shape"] == ["B", 256, 256, 3]
    assert doc["input"]["test_scale"] == {"width": 256, "height": 256}
    assert doc["normalisation"]["mean"] == list(config.data.mean) and doc["normalisation"]["std"] == list(config.data.std)
    assert doc["to_photo_size"]["resize"] == "bilinear" and doc["to_photo_size"]["align_corners"] is False
    assert doc["to_photo_size"]["of"] == "logits" and doc["to_photo_size"]["then"] == "sigmoid"
    assert doc["test_cfg"] == {"mode": "slide", "crop_size": [128, 128], "stride": [64, 64], "flip": True,
                               "weighting": "gaussian", "sigma_scale": 0.125}
    assert doc["versions"]["jax"] == jax.__version__ and doc["versions"]["jaxlib"]
    assert doc["platforms"] == ["cpu"] and [o["name"] for o in doc["outputs"]] == ["probabilities", "logits"]


def test_stablehlo_round_trip_with_a_symbolic_batch(exported, restored, config):
    """The artifact computes the in-package test-time function, for any batch size."""
    model, _ = restored
    fn = jax.jit(deploy.serving_function(model, config))
    loaded = serving.load(str(exported))
    images = np.stack([serving.photo_to_input(photo(seed=s), (256, 256)) for s in range(3)])
    for batch in (images[:1], images):
        probs, logits = loaded(batch)
        want_probs, want_logits = fn(jnp.asarray(batch))
        assert probs.shape == logits.shape == (len(batch), 256, 256, 4) and probs.dtype == jnp.float32
        assert float(jnp.max(jnp.abs(probs - want_probs))) <= 1e-5
        assert float(jnp.max(jnp.abs(logits - want_logits))) <= 1e-5 * float(jnp.max(jnp.abs(want_logits)))
    with pytest.raises(ValueError, match="uint8"):
        loaded(images.astype(np.float32))


def test_the_artifact_holds_no_custom_call_of_this_package(restored, config):
    """Exported even where this process runs the model on the package's CPU kernels (custom calls
    registered only here), the artifact holds XLA's own operations: it must run without the package."""
    from hrdecoder_jax.ops import library
    model, _ = restored
    with library.backend_scope("native"):
        fn = deploy.serving_function(model, config)
        assert "hrd_conv_fwd" in jax.jit(lambda x: model(x)).lower(
            jnp.zeros((1, 256, 256, 3), jnp.float32)).as_text()       # the kernels are in use here
        text = jax.export.export(jax.jit(fn), platforms=("cpu",))(deploy.input_spec(config)).mlir_module()
    assert "hrd_" not in text and "stablehlo.convolution" in text


def test_a_cpu_and_cuda_export_runs_on_the_cpu(restored, config):
    """Lowered for two platforms, the artifact keeps the model's platform-dependent fusion fences as a choice
    made when it is compiled; on this CPU it computes what the CPU-only export computes."""
    model, _ = restored
    fn = deploy.serving_function(model, config)
    both = jax.export.deserialize(bytearray(deploy.export_stablehlo(fn, deploy.input_spec(config), ("cpu", "cuda"))))
    assert both.platforms == ("cpu", "cuda")
    images = jnp.asarray(serving.photo_to_input(photo(), (256, 256))[None])
    probs, _ = both.call(images)
    want, _ = jax.jit(fn)(images)
    assert float(jnp.max(jnp.abs(probs - want))) <= 1e-5


BLOCKER = textwrap.dedent("""
    import importlib.abc, sys

    class Blocker(importlib.abc.MetaPathFinder):
        '''Importing Flax, TensorFlow (or Orbax, ml_collections) fails in this process.'''
        BLOCKED = ("flax", "tensorflow", "orbax", "ml_collections", "tensorflow_datasets")

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.BLOCKED:
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Blocker())
""")

LOADER = textwrap.dedent("""
    import sys
    import numpy as np
    for name in ("flax", "tensorflow"):
        try:
            __import__(name)
        except ImportError:
            pass
        else:
            raise SystemExit(f"{name} imported")
    import hrdecoder_jax.export
    model = hrdecoder_jax.export.load(sys.argv[1])
    for name in sys.argv[2:]:
        np.save(name + ".probs.npy", model.predict(np.load(name)))
    bad = [m for m in sys.modules if m.split(".")[0] in ("flax", "tensorflow", "orbax", "ml_collections")
           or m.startswith("hrdecoder_jax.") and m not in ("hrdecoder_jax.export", "hrdecoder_jax.serving",
                                                           "hrdecoder_jax.runtime")]   # runtime: stdlib only
    assert not bad, bad
    print("ok", model.lesions)
""")


def test_loader_needs_only_jax_and_matches_predict(exported, restored, config, tmp_path):
    """A process where Flax and TensorFlow cannot be imported loads the StableHLO artifact and predicts two
    photographs (a synthetic one and scikit-image's real retina, 1411 x 1411); its probabilities at each
    photo's size are ``predict``'s (float32, max abs <= 1e-5)."""
    import skimage.data

    from hrdecoder_jax.predict import predict_probabilities

    _, forward = restored
    photos = {"synthetic": photo(), "retina": skimage.data.retina()}
    for name, image in photos.items():
        np.save(tmp_path / f"{name}.npy", image)
    (tmp_path / "blocker.py").write_text(BLOCKER)
    script = "import blocker\n" + LOADER
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", script, str(exported),
                           *(str(tmp_path / f"{name}.npy") for name in photos)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "ok ('EX', 'HE', 'SE', 'MA')" in done.stdout
    for name, image in photos.items():
        got = np.load(tmp_path / f"{name}.npy.probs.npy")
        want = predict_probabilities(forward, image, config)
        assert got.shape == want.shape == (*image.shape[:2], 4) and got.dtype == np.float32
        assert np.abs(got - want).max() <= 1e-5, (name, np.abs(got - want).max())


@pytest.mark.skipif(not HAVE_ONNX, reason="the onnx extra (jax2onnx, onnx, onnxruntime) is not installed")
def test_onnx_agrees_with_the_package(exported, restored, config):
    import onnxruntime as ort
    model, _ = restored
    session = ort.InferenceSession(str(exported / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert session.get_inputs()[0].type == "tensor(uint8)" and session.get_inputs()[0].shape == ["B", 256, 256, 3]
    assert [o.name for o in session.get_outputs()] == ["probabilities", "logits"]
    images = np.stack([serving.photo_to_input(photo(seed=s), (256, 256)) for s in range(2)])
    want_probs, _ = jax.jit(deploy.serving_function(model, config))(jnp.asarray(images))
    for batch in (images[:1], images):
        probs, logits = session.run(None, {"images": batch})
        assert probs.shape == logits.shape == (len(batch), 256, 256, 4) and probs.dtype == np.float32
        assert np.abs(probs - np.asarray(want_probs)[:len(batch)]).max() <= 1e-4


# ----------------------------------------------------------------------------------------------------------
# Pieces
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("src,dst", [((200, 310), (256, 256)), ((37, 23), (256, 128)), ((1000, 700), (96, 128))])
def test_photo_to_input_is_the_evaluation_pipeline_bit_for_bit(src, dst):
    import tensorflow as tf

    from hrdecoder_jax.data import augment

    image = np.random.default_rng(sum(src)).integers(0, 256, (*src, 3), dtype=np.uint8)
    want = augment.quantize_uint8(augment.resize_bilinear(tf.constant(image), dst)).numpy()
    got = serving.photo_to_input(image, dst)
    assert got.dtype == np.uint8 and got.shape == (*dst, 3)
    np.testing.assert_array_equal(got.astype(np.float32), want)


@pytest.mark.parametrize("src,dst", [((64, 96), (200, 310)), ((64, 96), (50, 41)), ((16, 16), (64, 64))])
def test_logits_to_photo_is_the_package_resize_and_sigmoid(src, dst):
    from hrdecoder_jax.inference import probabilities

    logits = jnp.asarray(np.random.default_rng(0).normal(scale=6, size=(2, *src, 4)).astype(np.float32))
    got = np.asarray(serving.logits_to_photo(logits, dst))
    want = np.asarray(probabilities(logits, dst))
    assert got.shape == want.shape == (2, *dst, 4)
    assert np.abs(got - want).max() <= 1e-6


def test_for_platform_takes_the_branch_of_the_platform():
    def fenced(x):
        return jax.lax.platform_dependent(x, cpu=lambda v: v * 2.0, default=lambda v: v + 1.0)

    x = jnp.arange(3.0)
    for platform, want in (("cpu", x * 2), ("onnx", x + 1)):
        fn = deploy.for_platform(fenced, platform)
        text = str(jax.make_jaxpr(fn)(x))
        assert "platform_index" not in text and "cond" not in text, text
        np.testing.assert_array_equal(jax.jit(fn)(x), want)


def test_write_export_is_all_or_nothing(tmp_path):
    out = tmp_path / "export"
    deploy.write_export(str(out), {"a.bin": lambda p: pathlib.Path(p).write_bytes(b"1")}, {"v": 1})
    assert sorted(os.listdir(out)) == ["a.bin", "manifest.json"]

    def broken(path):
        pathlib.Path(path).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        deploy.write_export(str(out), {"b.bin": broken}, {"v": 2})
    # The previous export is untouched and nothing partial is left beside it.
    assert sorted(os.listdir(out)) == ["a.bin", "manifest.json"]
    assert json.loads((out / "manifest.json").read_text()) == {"v": 1}
    assert sorted(os.listdir(tmp_path)) == ["export"]
    deploy.write_export(str(out), {"b.bin": lambda p: pathlib.Path(p).write_bytes(b"2")}, {"v": 2})
    assert sorted(os.listdir(out)) == ["b.bin", "manifest.json"]
    assert sorted(os.listdir(tmp_path)) == ["export"]


@pytest.mark.parametrize("extra,expect,status", [
    (["--format", "tflite"], "--format", 2),
    (["--platforms", "metal"], "--platforms", 2),
    (["--output", "{other}"], "holds other files", 1),
    (["--checkpoint", "9"], "no checkpoint for step 9", 1),
])
def test_bad_exports_end_in_one_line(extra, expect, status, workdir, tmp_path, capsys):
    from hrdecoder_jax import export

    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    extra = [a.format(other=other) for a in extra]
    args = ["--config", TINY, "--workdir", str(workdir), "--output", str(tmp_path / "out"), *extra]
    assert export.main(args) == status
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and expect in err[0], err
    assert (other / "notes.txt").read_text() == "mine" and not (tmp_path / "out").exists()
    assert not [n for n in os.listdir(tmp_path) if "partial" in n]


def test_load_refuses_a_folder_that_is_not_an_export(tmp_path):
    with pytest.raises(serving.ArtifactError, match="no manifest.json"):
        serving.load(str(tmp_path))
