"""The benchmark: a cheap run on the tiny config, the CLI, and every config's model built abstractly."""
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import pytest
from flax import nnx

from helpers import one_error_line_of
from hrdecoder_jax import benchmark, cli, config_utils
from hrdecoder_jax.models import build_model, count_params

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG_SPECS = [
    "configs/tiny.py",
    *[f"configs/{name}.py:{variant}" for name in ("synthetic", "idrid", "ddr")
      for variant in ("hrdecoder", "efficient", "fcn_lr", "fcn_hr")],
]


def _config(spec):
    return cli.load_config(str(REPO / spec))


@pytest.fixture(scope="module")
def tiny_result():
    return benchmark.run_benchmark(_config("configs/tiny.py"), what=("train", "infer", "memory", "flops"),
                                   repeats=2)


def test_run_benchmark_tiny(tiny_result):
    r = tiny_result
    assert r["platform"] == jax.devices()[0].platform and r["jax_version"] == jax.__version__
    assert r["train_image_size"] == [256, 256] and r["infer_image_size"] == [256, 256]
    assert r["params"] == 1_527_520
    positive = ["params", "train_compile_s", "train_step_median_s", "train_step_min_s", "train_images_per_s",
                "infer_compile_s", "infer_median_s", "infer_min_s", "infer_images_per_s",
                "train_flops_per_image", "infer_flops_per_image",
                "train_mem_temp_bytes", "train_mem_argument_bytes", "train_mem_output_bytes",
                "train_mem_peak_estimate_bytes", "infer_mem_argument_bytes", "infer_mem_peak_estimate_bytes"]
    for key in positive:
        assert r[key] > 0, key
    assert r["train_step_min_s"] <= r["train_step_median_s"]
    # One compilation for the warm-up and the 2 timed steps although every step draws other crops.
    assert r["train_compile_count"] == 1
    assert r["train_jit_cache_size"] == 1
    assert r["train_distinct_crop_draws"] == 3
    assert r["infer_compile_count"] == 1
    # Params, opt state and BN statistics are donated: aliased bytes are most of the outputs.
    assert r["train_mem_alias_bytes"] > 0.9 * r["train_mem_output_bytes"]
    assert r["train_mem_peak_estimate_bytes"] == (r["train_mem_temp_bytes"] + r["train_mem_argument_bytes"]
                                                  + r["train_mem_output_bytes"] - r["train_mem_alias_bytes"])
    # A train step (forward, backward, three head calls) costs more than the eval forward.
    assert r["train_flops_per_image"] > 2 * r["infer_flops_per_image"]
    assert "device_peak_bytes" in r   # None on a CPU
    if r["platform"] == "cpu":
        assert r["device_peak_bytes"] is None
    json.dumps(r)   # serialisable
    assert benchmark.format_table(r).count("\n") == len(r) + 1


def test_flops_fcn_vs_hrdecoder(tiny_result):
    """Compile-only FLOPs: the FCN baseline runs the backbone at the full 256 x 256 image, HRDecoder at its
    128 x 128 hr_scale (plus five calls of its 7x7 head, which dominate at this tiny size), so the FCN
    forward costs more and 4x more at twice the side; the abstract build (no weights) gives the same
    figures as the concrete one."""
    cfg = _config("configs/tiny.py")
    abstract = benchmark.run_benchmark(cfg, what=("flops_infer",))
    assert abstract["infer_flops_per_image"] == pytest.approx(tiny_result["infer_flops_per_image"], rel=1e-6)
    assert abstract["params"] == tiny_result["params"]
    cfg.model = config_utils.fcn_baseline_config(width=18, num_modules=(1, 1, 1, 1), num_blocks=1,
                                                 test_mode="whole", test_crop_size=(256, 256),
                                                 test_stride=(128, 128))
    fcn = benchmark.run_benchmark(cfg, what=("flops_infer",))
    assert fcn["model_type"] == "FCN" and fcn["hr_scale"] is None
    assert fcn["infer_flops_per_image"] > abstract["infer_flops_per_image"]
    # The FCN's cost grows with the image area; HRDecoder's backbone cost is fixed by hr_scale.
    fcn_half = benchmark.run_benchmark(cfg, what=("flops_infer",), image_size=(128, 128))
    assert 3.5 < fcn["infer_flops_per_image"] / fcn_half["infer_flops_per_image"] < 4.5


def test_cli_infer(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert benchmark.main(["--config", str(REPO / "configs/tiny.py"), "--what", "infer", "--repeats", "1",
                           "--hr_scale", "64", "--image_size", "128,128", "--config.model.test_cfg.mode=whole",
                           "--json", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "device:" in stdout and "infer_images_per_s" in stdout
    res = json.loads(out.read_text())
    assert json.loads(stdout.strip().splitlines()[-1]) == res
    assert res["hr_scale"] == [64, 64] and res["infer_image_size"] == [128, 128]
    assert res["infer_median_s"] > 0 and "train_step_median_s" not in res
    assert benchmark.main(["--config", str(REPO / "configs/tiny.py"), "--bogus"]) == 2
    assert "bogus" in capsys.readouterr().err


@pytest.mark.parametrize("spec", CONFIG_SPECS)
def test_every_config_builds_abstractly(spec):
    cfg = _config(spec)
    config_utils.validate_config(cfg)
    model = nnx.eval_shape(lambda: build_model(cfg.model, rngs=nnx.Rngs(0)))
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n == count_params(model) > 0


def test_idrid_w48_parameter_count():
    model = benchmark.abstract_model(_config("configs/idrid.py").model)
    assert count_params(model) == 65_572_420


def test_with_width():
    cfg = _config("configs/idrid.py:fcn_hr")
    m = benchmark.with_width(cfg.model, 18)
    assert m.backbone.extra.stage4.num_channels == (18, 36, 72, 144)
    assert m.decode_head.in_channels == m.decode_head.channels == 270
    assert cfg.model.backbone.extra.stage4.num_channels == (48, 96, 192, 384)   # the original is untouched
    config_utils.validate_model_config(m)
    eff = benchmark.with_width(_config("configs/ddr.py:efficient").model, 18)
    assert eff.decode_head.in_channels == 256   # the compressor's visual_dim, not the backbone width


def test_configs_and_benchmark_need_no_tensorflow(tmp_path):
    """GPU images and notebooks often lack TensorFlow: the configs, the model and the benchmark's
    model measurements import without it (only the data pipeline and ``--what input`` need it)."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('tensorflow', 'tensorflow_datasets'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from hrdecoder_jax import benchmark, cli\n"
        f"for spec in {CONFIG_SPECS!r}:\n"
        f"    cli.load_config({str(REPO)!r} + '/' + spec)\n"
        f"assert benchmark.main(['--config', {str(REPO / 'configs' / 'tiny.py')!r}, '--what', 'flops_infer', "
        "'--json', 'bench.json']) == 0\n"
        "import json\n"
        "assert json.load(open('bench.json'))['infer_flops_per_image'] > 0\n"
        "assert not any(m.split('.')[0] in ('tensorflow', 'tensorflow_datasets') for m in sys.modules)\n"
        "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")


def test_gpu_benchmark_script_smoke_row(tmp_path):
    """launch/gpu_benchmark.sh (the README's GPU rows) runs its smoke row on any machine and appends one
    JSON line per finished row."""
    env = dict(os.environ, PYTHON=sys.executable)
    result = subprocess.run(["bash", str(REPO / "launch" / "gpu_benchmark.sh"), str(tmp_path), "280", "smoke"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    row = rows[0]
    assert row["config"].endswith("configs/tiny.py") and row["params"] == 1_527_520
    assert row["train_compile_count"] == 1 and row["train_step_median_s"] > 0
    assert "== tiny" in (tmp_path / "log.txt").read_text()


def test_benchmark_checks_its_json_output_before_measuring(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    from hrdecoder_jax import benchmark
    (tmp_path / "a_file").write_text("x")
    assert benchmark.main(["--config=configs/tiny.py", "--what=infer", f"--json={tmp_path / 'a_file' / 'b.json'}"]) == 1
    captured = capsys.readouterr()
    assert "device:" not in captured.out                      # nothing was measured
    assert "--json's folder" in one_error_line_of(captured.err) and "not writable" in captured.err
