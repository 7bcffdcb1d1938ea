"""The built-in default: a small HRDecoder on the synthetic fundus dataset, sized for a 2-core CPU.

  python -m hrdecoder_jax.train --config configs/synthetic.py --workdir runs/synthetic

Generates the dataset on first use (512x512 images, 48 train (5 held out for validation) / 16 test),
trains a W18 HRDecoder with two modules fewer than HRNetV2 for 10 minutes of CPU or so,
then evaluates on the test split and prints the per-lesion table.
Variants ``--config configs/synthetic.py:VARIANT``: hrdecoder (default), efficient, fcn_lr, fcn_hr.
"""
from hrdecoder_jax import config_utils


def get_config(variant: str = "hrdecoder"):
    config = config_utils.base_config()
    config.seed = 0
    config.total_steps = 300
    config.global_batch_size = 4
    config.log_every = 10
    config.eval_every = 100
    config.checkpoint_every = 100
    config.optimizer.warmup_steps = 30
    config.optimizer.lr = 0.05
    config.data = config_utils.synthetic_data_config(image_size=(512, 512), crop_size=(256, 256),
                                                     ratio_range=(0.5, 1.0))
    config.data.cat_max_ratio = 1.0   # the re-draw loop almost never succeeds anyway (SPEC g)
    small = dict(width=18, num_modules=(1, 1, 1, 1), num_blocks=(1, 1, 1, 1), channels=32,
                 kernel_size=3)
    slide = dict(test_mode="slide", test_crop_size=(256, 256), test_stride=(128, 128))
    if variant == "hrdecoder":
        config.model = config_utils.model_config(hr_scale=(128, 128), **small, **slide)
    elif variant == "efficient":
        config.model = config_utils.model_config(kind="EfficientHRDecoder", visual_dim=32, compress=False,
                                                 hr_scale=(128, 128), **small, **slide)
    elif variant in ("fcn_lr", "fcn_hr"):
        small_fcn = {k: v for k, v in small.items() if k not in ("channels", "kernel_size")}
        config.model = config_utils.fcn_baseline_config(**small_fcn, **slide)
        if variant == "fcn_lr":   # the network sees a half-resolution crop; test upsamples its logits
            config.data.img_scale = (256, 256)
            config.data.test_scale = (256, 256)
            config.data.crop_size = (128, 128)
            config.model.test_cfg.update(crop_size=(128, 128), stride=(64, 64))
    else:
        raise ValueError(f"unknown variant {variant!r} of configs/synthetic.py")
    return config
