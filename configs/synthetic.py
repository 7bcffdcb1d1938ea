"""The built-in default: a small HRDecoder on the synthetic fundus dataset, sized for a 2-core CPU.

  python -m hrdecoder_jax.train --config configs/synthetic.py --workdir runs/synthetic

Generates the dataset on first use (512x512 images, 48 train (5 held out for validation) / 16 test),
trains a shallow W18 HRDecoder (one module and one block per stage, 32-channel 3x3 head, hr_scale 128 on
256 crops) for 1500 steps of batch 4 (about 10 minutes on a 2-core CPU), then evaluates on the test
split and prints the per-lesion table.
Variants ``--config configs/synthetic.py:VARIANT``: hrdecoder (default), efficient, fcn_lr, fcn_hr; the
FCN baselines share HRDecoder's backbone and head and see half-resolution images (fcn_lr) or the
full-resolution crops (fcn_hr). ``toy``: a width-4 HRDecoder on 64 px images for 4 steps, the model of the
tests and of launch/reliability_cases.py, which runs in seconds (configs/tiny.py is the fixtures' model).
"""
from hrdecoder_jax import config_utils


def get_config(variant: str = "hrdecoder"):
    config = config_utils.base_config()
    config.seed = 0
    config.total_steps = 1500
    config.global_batch_size = 4
    config.log_every = 50
    config.eval_every = 500
    config.checkpoint_every = 250
    # AdamW for the demo: the paper's SGD schedule (kept in configs/idrid.py and ddr.py) needs thousands
    # of steps before the dice loss moves; AdamW reaches a useful model within the CPU budget.
    config.optimizer.update(name="adamw", lr=2e-3, weight_decay=1e-4, warmup_steps=50)
    config.data = config_utils.synthetic_data_config(image_size=(512, 512), crop_size=(256, 256),
                                                     ratio_range=(0.5, 1.0))
    config.data.cat_max_ratio = 1.0   # mmseg re-draws a crop up to 10 times while one class covers > cat_max_ratio; off here
    if variant == "toy":
        return _toy(config)
    small = dict(width=18, num_modules=(1, 1, 1, 1), num_blocks=(1, 1, 1, 1), channels=32,
                 kernel_size=3)
    slide = dict(test_mode="slide", test_crop_size=(256, 256), test_stride=(128, 128))
    if variant == "hrdecoder":
        config.model = config_utils.model_config(hr_scale=(128, 128), **small, **slide)
    elif variant == "efficient":
        config.model = config_utils.model_config(kind="EfficientHRDecoder", visual_dim=32, compress=False,
                                                 hr_scale=(128, 128), **small, **slide)
    elif variant in ("fcn_lr", "fcn_hr"):
        # The baselines keep HRDecoder's head (1x1 compress to 32, 3x3, classifier) so that the tiny-lesion
        # study compares resolution strategies only; configs/idrid.py and ddr.py use the paper's FCN head.
        config.model = config_utils.model_config(kind="FCN", **small, **slide)
        config.model.hr_settings = None
        if variant == "fcn_lr":   # the network sees a half-resolution crop; test upsamples its logits
            config.data.img_scale = (256, 256)
            config.data.test_scale = (256, 256)
            config.data.crop_size = (128, 128)
            config.model.test_cfg.update(crop_size=(128, 128), stride=(64, 64))
    else:
        raise ValueError(f"unknown variant {variant!r} of configs/synthetic.py")
    return config


def _toy(config):
    """A width-4 HRDecoder on 64 px images (hr_scale 32) for a smoke run (``config_utils.smoke_schedule``)."""
    config.model = config_utils.model_config(width=4, num_modules=(1, 1, 1, 1), num_blocks=1, channels=8,
                                             kernel_size=3, hr_scale=(32, 32), crop_num=2,
                                             test_mode="slide", test_crop_size=(64, 64), test_stride=(32, 32))
    config.data = config_utils.synthetic_data_config(image_size=(64, 64), num_train=7, num_test=2,
                                                     crop_size=(64, 64), ratio_range=(0.75, 1.25))
    return config_utils.smoke_schedule(config)
