"""HRDecoder-W48 on IDRiD at the paper settings (reference: hrdecoder_fcn_hr48_idrid_2880x1920-slide).

  python -m hrdecoder_jax.train --config configs/idrid.py --workdir runs/idrid \
      --config.data.manual_dir=/path/to/A.Segmentation            # the official zip or its folder

Variants, ``--config configs/idrid.py:VARIANT``:
  hrdecoder (default)  HRDecoder, 2880x1920 images, 1920 crops, hr_scale 960, M=2 crops, slide test
  efficient            Efficient-HRDecoder (1x1 compressor to visual_dim=64, head without compress)
  fcn_lr               FCN baseline at the M2MRF low resolution (1440x960 images, 960 crops)
  fcn_hr               FCN baseline at full resolution (2880x1920 images, 1920 crops)
Reported by the authors (released weights): mIoU 52.20, mAUPR 71.34.
"""
from hrdecoder_jax import config_utils


def get_config(variant: str = "hrdecoder"):
    config = config_utils.base_config()
    config.seed = 2
    config.total_steps = 20000
    config.eval_every = 2000
    config.data = config_utils.default_data_config()
    if variant == "hrdecoder":
        config.model = config_utils.model_config()
    elif variant == "efficient":
        config.model = config_utils.model_config(kind="EfficientHRDecoder", visual_dim=64, compress=False)
    elif variant in ("fcn_lr", "fcn_hr"):
        config.model = config_utils.fcn_baseline_config(test_mode="slide")
        if variant == "fcn_lr":
            config.data.img_scale = (1440, 960)
            config.data.test_scale = (1440, 960)
            config.data.crop_size = (960, 960)
            config.model.test_cfg.update(crop_size=(960, 960), stride=(480, 480))
    else:
        raise ValueError(f"unknown variant {variant!r} of configs/idrid.py "
                         "(hrdecoder, efficient, fcn_lr, fcn_hr)")
    return config
