"""Bilinear resizing without gathers: every plan (stencils, banded products, traced matrices) against PyTorch,
and the compiled train step free of gathers and scatters."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hrdecoder_jax import config_utils
from hrdecoder_jax.models import build_model, resize as R

torch = pytest.importorskip("torch")

# (n_in, n_out, expected plan): HRNet's fuse factors, the 2x input downscale, IDRiD's test-to-original
# resize (1920 -> 2848, 2880 -> 4288), odd ratios, and sizes 1 and 2 where every sample is a border.
CASES = [(240, 480, "up"), (30, 240, "up"), (2, 16, "up"), (1, 8, "up"), (13, 39, "up"), (1920, 960, "down"),
         (960, 240, "down"), (9, 3, "down"), (7, 16, "banded"), (1920, 2848, "banded"), (2880, 4288, "banded"),
         (256, 200, "banded"), (37, 100, "banded"), (100, 37, "banded")]


def torch_resize(x, n_out):
    t = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2)
    return torch.nn.functional.interpolate(t, (n_out, x.shape[2]), mode="bilinear").permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("n_in,n_out,plan", CASES)
def test_static_resize_equals_pytorch(n_in, n_out, plan, dtype):
    assert R._plan(n_in, n_out, dtype)[0] == plan
    x = np.random.default_rng(n_in * 7 + n_out).standard_normal((1, n_in, 3, 2)).astype(dtype)
    with jax.enable_x64(dtype == "float64"):
        ours = np.asarray(R.resize_axis(jnp.asarray(x), n_out, 1))
        assert ours.dtype == np.dtype(dtype)
    err = np.abs(ours - torch_resize(x, n_out)).max() / np.abs(x).max()
    # Rounding only: float32 source coordinates are rounded exactly as PyTorch's fused multiply-add
    # (measured <= 4e-7); in float64 they may differ by one rounding of a coordinate up to 4288, about
    # 4288 * 2^-52 = 1e-12 in a weight (measured <= 1.3e-13).
    assert err < (1e-6 if dtype == "float32" else 1e-12), err


def test_resize_of_both_axes_and_its_gradient_equal_pytorch():
    x = np.random.default_rng(0).standard_normal((2, 24, 40, 3)).astype(np.float64)
    with jax.enable_x64(True):
        loss = lambda a: jnp.sum(R.resize_bilinear(a, (37, 160)) ** 2)
        grad = np.asarray(jax.grad(loss)(jnp.asarray(x)))
    t = torch.from_numpy(x).permute(0, 3, 1, 2).requires_grad_()
    (torch.nn.functional.interpolate(t, (37, 160), mode="bilinear") ** 2).sum().backward()
    np.testing.assert_allclose(grad, t.grad.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-12)


def test_compiled_train_step_has_no_gather_or_scatter():
    """The optimised HLO of the trainer's own step (random crops, windows, fusion, label crops, backward)."""
    from hrdecoder_jax.optim import make_optimizer
    from hrdecoder_jax.train_step import make_train_step, split_for_training
    cfg = config_utils.model_config(width=8, num_modules=(1, 1, 1, 1), num_blocks=1, hr_scale=(64, 64),
                                    crop_num=2, channels=8, kernel_size=3)
    model = nnx.eval_shape(lambda: build_model(cfg, rngs=nnx.Rngs(0)))
    model.train()
    structure, params, rest = split_for_training(model)
    tx = make_optimizer(config_utils.optimizer_config(), 100)
    from hrdecoder_jax.data import on_device
    # With the device end of the input pipeline, as the trainer runs it (raw uint8 crops in).
    step = jax.jit(make_train_step(structure, tx, seed=0,
                                   finish=on_device.make_finish(config_utils.default_data_config())))
    hlo = step.lower(params, rest, jax.eval_shape(tx.init, params), jax.ShapeDtypeStruct((), jnp.int32),
                     {"image": jax.ShapeDtypeStruct((1, 128, 128, 3), jnp.uint8),
                      "valid": jax.ShapeDtypeStruct((1, 2), jnp.int32)},
                     jax.ShapeDtypeStruct((1, 128, 128), jnp.uint8)).compile().as_text()
    ops = set(re.findall(r"= \S+ ([a-z\-]+)\(", hlo))
    assert "convolution" in ops or any("fusion" in o for o in ops)     # it is the real step
    assert not {o for o in ops if "gather" in o or "scatter" in o}, ops
