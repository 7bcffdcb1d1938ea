"""The Python API computes what the commands compute: a model restored and run as the README's API section
shows, in a fresh process, gives ``predict``'s probabilities bit for bit.

Both run in subprocesses without the test session's ``XLA_FLAGS`` (conftest sets 4 fake devices and XLA's
Eigen path): a user's process has one CPU device and whatever ``import hrdecoder_jax`` / ``setup`` give it.
"""
import os
import pathlib
import subprocess
import sys

import numpy as np
from PIL import Image

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = str(REPO / "configs" / "tiny.py")

API_SCRIPT = """
import sys
import numpy as np
import hrdecoder_jax                                   # applies the commands' CPU options (nothing started yet)
if sys.argv[4] == "setup":
    hrdecoder_jax.setup("inference")                  # the documented call, as the inference commands do
from flax import nnx
from PIL import Image
from hrdecoder_jax import checkpoint, cli
from hrdecoder_jax.inference import inference, probabilities
from hrdecoder_jax.models import build_model
from hrdecoder_jax.ops import library
from hrdecoder_jax.predict import preprocess

config = cli.load_config(sys.argv[1])
model = nnx.eval_shape(lambda: build_model(config.model, rngs=nnx.Rngs(0)))
checkpoint.restore_model(sys.argv[2], model, "latest")
model.eval()
image = np.asarray(Image.open(sys.argv[3]).convert("RGB"))
logits = inference(model, preprocess(image, config.data), config.model.test_cfg)
np.save(sys.argv[3] + "." + sys.argv[4] + ".npy", np.asarray(probabilities(logits, image.shape[:2])[0], np.float32))
print("kernels", library.in_effect())
"""


def _env():
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")])
    return env


def test_api_forward_equals_the_predict_command_bit_for_bit(converted, tmp_path):
    workdir = converted
    rng = np.random.default_rng(5)
    photo = tmp_path / "photo.png"
    Image.fromarray(rng.integers(0, 256, (300, 340, 3), dtype=np.uint8)).save(photo)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "hrdecoder_jax.predict", "--config", TINY, "--workdir", str(workdir), "--input",
           str(photo), "--output", str(out), "--save_npy"]
    done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    command = np.load(out / "photo_probs.npy")
    for mode in ("setup", "import"):
        done = subprocess.run([sys.executable, "-c", API_SCRIPT, TINY, str(workdir), str(photo), mode],
                              env=_env(), capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        api = np.load(f"{photo}.{mode}.npy")
        assert api.shape == command.shape == (300, 340, 4)
        np.testing.assert_array_equal(api, command, err_msg=mode)
