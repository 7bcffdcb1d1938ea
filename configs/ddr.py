"""HRDecoder-W48 on DDR at the paper settings (reference: hrdecoder_fcn_hr48_ddr_2048).

  python -m hrdecoder_jax.train --config configs/ddr.py --workdir runs/ddr \
      --config.data.manual_dir=/path/to/DDR-dataset/lesion_segmentation

Variants, ``--config configs/ddr.py:VARIANT``:
  hrdecoder (default)  HRDecoder, 2048x2048 images and crops, hr_scale 1024, M=4 crops, whole-image test
  efficient            Efficient-HRDecoder (visual_dim=256, head with compress)
  fcn_lr               FCN baseline at 1024x1024
  fcn_hr               FCN baseline at 2048x2048
Reported by the authors (released weights): mIoU 32.24, mAUPR 49.24.
"""
from hrdecoder_jax import config_utils


def get_config(variant: str = "hrdecoder"):
    config = config_utils.base_config()
    config.seed = 14 if variant == "hrdecoder" else 2
    config.total_steps = 40000
    config.eval_every = 4000
    config.data = config_utils.ddr_data_config()
    whole = dict(test_mode="whole", test_crop_size=(2048, 2048), test_stride=(1024, 1024))
    if variant == "hrdecoder":
        config.model = config_utils.model_config(hr_scale=(1024, 1024), crop_num=4, **whole)
    elif variant == "efficient":
        config.model = config_utils.model_config(kind="EfficientHRDecoder", visual_dim=256, compress=True,
                                                 hr_scale=(1024, 1024), crop_num=4, **whole)
    elif variant in ("fcn_lr", "fcn_hr"):
        config.model = config_utils.fcn_baseline_config(**whole)
        # The reference's DDR baseline: poly power 0.9 down to 1e-4.
        config.optimizer.update(power=0.9, min_lr=1e-4)
        if variant == "fcn_lr":
            config.data.img_scale = (1024, 1024)
            config.data.test_scale = (1024, 1024)
            config.data.crop_size = (1024, 1024)
    else:
        raise ValueError(f"unknown variant {variant!r} of configs/ddr.py (hrdecoder, efficient, fcn_lr, fcn_hr)")
    return config
