"""The tiny-lesion study runs end to end (at toy size) and writes its table, JSON and plot."""
import json

from hrdecoder_jax.experiments.tiny_lesion_study import run_study, study_config


def test_study_config_keeps_the_budget_equal():
    configs = {v: study_config(v, steps=7) for v in ("fcn_lr", "fcn_hr", "hrdecoder", "efficient")}
    assert {c.total_steps for c in configs.values()} == {7}
    assert {c.global_batch_size for c in configs.values()} == {4}
    assert {c.model.backbone.extra.stage4.num_channels for c in configs.values()} == {(18, 36, 72, 144)}
    assert configs["fcn_lr"].data.crop_size == (128, 128) and configs["fcn_hr"].data.crop_size == (256, 256)
    assert configs["hrdecoder"].model.hr_settings.hr_scale == (128, 128)
    # the FCN baselines use HRDecoder's head, so only the resolution strategy differs
    heads = [configs[v].model.decode_head.to_dict() for v in ("fcn_lr", "fcn_hr", "hrdecoder")]
    assert heads[0] == heads[1] == heads[2] and heads[0]["compress"] and heads[0]["channels"] == 32
    big = study_config("hrdecoder", steps=7, scale=4)
    assert big.data.crop_size == (1024, 1024) and big.model.hr_settings.hr_scale == (512, 512)


def test_study_runs_at_toy_size_with_two_seeds(tmp_path):
    runs = run_study(str(tmp_path / "study"), steps=2, scale=0.25, models=("fcn_lr", "hrdecoder"), seeds=(0, 1),
                     data_dir=str(tmp_path / "data"))
    assert [(r["model"], r["seed"]) for r in runs] == [("FCN-LR", 0), ("HRDecoder", 0), ("FCN-LR", 1),
                                                      ("HRDecoder", 1)]
    for r in runs:
        assert len(r["IoU"]) == 4 and 0 <= r["mIoU"] <= 1 and r["train_memory_bytes"] > 0 and r["infer_flops"] > 0
    assert runs[0]["train_image"] == [32, 32] and runs[1]["train_image"] == [64, 64]   # FCN-LR: half-size crops
    saved = json.loads((tmp_path / "study" / "study.json").read_text())
    assert saved["runs"] == runs
    summary = {r["model"]: r for r in saved["summary"]}
    hr = [r for r in runs if r["model"] == "HRDecoder"]
    assert summary["HRDecoder"]["seeds"] == [0, 1]
    assert abs(summary["HRDecoder"]["mIoU"] - (hr[0]["mIoU"] + hr[1]["mIoU"]) / 2) < 1e-12
    assert abs(summary["HRDecoder"]["mIoU_std"] - abs(hr[0]["mIoU"] - hr[1]["mIoU"]) / 2 ** 0.5) < 1e-12
    assert (tmp_path / "study" / "study.png").stat().st_size > 1000
    table = (tmp_path / "study" / "study.md").read_text()
    assert "| HRDecoder |" in table and "±" in table
    # Finished runs are read back, not trained again.
    again = run_study(str(tmp_path / "study"), steps=2, scale=0.25, models=("hrdecoder",), seeds=(0,),
                      data_dir=str(tmp_path / "data"))
    assert again == [runs[1]]
