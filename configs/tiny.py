"""Tiny HRDecoder (W18, one module and one block per stage) on 256 x 256 images, hr_scale 128.

The architecture of the reference fixtures in ``tests/fixtures/tiny_w18_256_hr128_*``;
used by the tests and as a seconds-long smoke run on the tiny synthetic dataset:

  python -m hrdecoder_jax.train --config configs/tiny.py --workdir runs/tiny
"""
from hrdecoder_jax import config_utils


def get_config():
    config = config_utils.base_config()
    config.seed = 0
    config.model = config_utils.model_config(
        width=18, num_modules=(1, 1, 1, 1), num_blocks=1, hr_scale=(128, 128), crop_num=2,
        test_mode="whole", test_crop_size=(256, 256), test_stride=(128, 128))
    config.data = config_utils.synthetic_data_config(image_size=(256, 256), num_train=6, num_test=2,
                                                     crop_size=(256, 256), ratio_range=None)
    return config_utils.smoke_schedule(config)
