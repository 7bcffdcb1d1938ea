#!/usr/bin/env python
"""Train the ORIGINAL HRDecoder with its own mmseg/mmcv machinery on a CPU, on files in its dataset layout.

A development tool beside the project (never imported by it), run with the original's interpreter, the
environment ``setup_original.sh`` builds in ``$HRD_ORIGINAL`` (``original.py`` beside this file puts the
original's source on the import path):

  $HRD_ORIGINAL/venv/bin/python launch/reference/train_reference.py --data DIR --work-dir OUT --seed 0 [--iters 1500]

``DIR`` is a dataset in the reference repository's layout (``images/{train,test}/*.jpg``,
``labels/{train,test}/*.png`` fused labels 0..4), e.g. written by
``python -m hrdecoder_jax.tools.write_layout --layout mmseg-png``. The model, data pipeline, optimiser and
schedule are the original's own classes (``HRDecoder``, ``LesionDataset`` and its pipeline, mmcv's
optimiser builder, ``IterBasedRunner`` with the poly/linear-warm-up lr hook, the lesion ``EvalHook``),
configured like ``configs/synthetic.py`` of hrdecoder-jax: HRNetV2-W18 with one module and one block per
stage, the 1x1-compress + 3x3 head of 32 channels, ``hr_scale`` 128 with 2 crops on 256 px crops of
512 px images (resize ratio 0.5-1, flip, rotation 45 degrees), AdamW lr 2e-3 / weight decay 1e-4 with 50
warm-up iterations, batch 4, BN instead of SyncBN (one process), test in slide mode (256 windows, stride
128). The test split is evaluated every ``--eval-every`` iterations with the original's lesion metrics;
everything is written to ``OUT``: mmcv's ``*.log.json`` (losses every ``--log-every`` iterations and the
evaluations) and ``final_metrics.json`` (per-lesion IoU, AUPR, ... of the last iteration).

The only things not the original's: the driver (the repository's ``tools/train.py`` needs CUDA: its
``train_segmentor`` moves the model to a GPU; here ``MMDataParallel`` runs on the CPU) and BN for SyncBN.
"""
import argparse
import copy
import json
import os
import os.path as osp
import time

import original

# The original's source and stand-ins on sys.path (from $HRD_ORIGINAL) before anything of it is imported.
ORIGINAL_SRC = original.activate()
import mmcv
import numpy as np
import torch
from mmcv import Config, ConfigDict
from mmcv.parallel import MMDataParallel
from mmcv.runner import build_optimizer, build_runner
from mmseg.apis import set_random_seed, single_gpu_test
from mmseg.core import EvalHook
from mmseg.datasets import build_dataloader, build_dataset
from mmseg.models.builder import build_train_model

CONFIG = 'configs/lesion/hrdecoder_fcn_hr48_idrid_2880x1920-slide.py'
LESIONS = ('EX', 'HE', 'SE', 'MA')


def lesion_scores(results, dataset):
    """The original's lesion metrics (``mmseg.core.lesion_metrics``, its lesion_metric.py) of ``results``
    on ``dataset``: per-lesion lists (EX, HE, SE, MA) and the means over the four lesions, as
    ``LesionDataset._evaluate`` computes them. (That method's summary table has a format bug, eight
    placeholders for seven values, and raises, so its evaluation is called through here.)"""
    from mmseg.core import lesion_metrics
    gts = dataset.get_gt_seg_maps()
    iou, f1, ppv, s, aupr, mae = lesion_metrics(results, gts, 5, ignore_index=dataset.ignore_index)
    out = {'IoU': iou, 'F1': f1, 'PPV': ppv, 'S': s, 'AUPR': aupr, 'MAE': mae}
    out = {k: [float(x) for x in np.asarray(v)[-4:]] for k, v in out.items()}
    for k in ('IoU', 'F1', 'PPV', 'S', 'AUPR', 'MAE'):
        out['m' + k] = float(np.nanmean(np.nan_to_num(np.asarray(out[k]), nan=0)))
    return out


class LesionEvalHook(EvalHook):
    """Evaluate the test split every ``interval`` iterations with the original's metrics; one JSON line per
    evaluation in ``WORK_DIR/eval_log.jsonl``."""

    def evaluate(self, runner, results):
        scores = lesion_scores(results, self.dataloader.dataset)
        with open(osp.join(runner.work_dir, 'eval_log.jsonl'), 'a') as f:
            f.write(json.dumps({'iter': runner.iter + 1, **scores}) + '\n')
        runner.logger.info('iter %d: test mIoU %.2f mAUPR %.2f', runner.iter + 1, 100 * scores['mIoU'],
                           100 * scores['mAUPR'])
        return None


def build_config(args):
    cfg = Config.fromfile(osp.join(ORIGINAL_SRC, CONFIG))
    m = cfg.model
    m.pretrained = None
    bn = dict(type='BN', requires_grad=True)
    m.backbone.norm_cfg = bn
    m.decode_head.norm_cfg = bn
    widths = {2: (18, 36), 3: (18, 36, 72), 4: (18, 36, 72, 144)}
    for s in (1, 2, 3, 4):
        e = m.backbone.extra[f'stage{s}']
        e.num_modules = 1
        e.num_blocks = tuple([1] * len(e.num_blocks))
        if s > 1:
            e.num_channels = widths[s]
    m.decode_head.update(in_channels=sum(widths[4]), channels=32, kernel_size=3, num_convs=1, compress=True,
                         concat_input=False, dropout_ratio=-1, num_classes=4)
    m.hr_settings.update(hr_scale=(128, 128), crop_num=2, scale_ratio=(0.75, 1.25), divisible=8,
                         hr_loss_weight=0.1, lr_loss_weight=0)
    m.test_cfg = ConfigDict(mode='slide', crop_size=(256, 256), stride=(128, 128), compute_aupr=True)
    # Data: the reference's lesion pipeline at the synthetic sizes.
    image_scale, crop = (512, 512), (256, 256)
    for step in cfg.data.train.pipeline:
        if step['type'] == 'Resize':
            step.update(img_scale=image_scale, ratio_range=(0.5, 1.0))
        elif step['type'] == 'RandomCrop':
            step.update(crop_size=crop, cat_max_ratio=1.0)
        elif step['type'] == 'Pad':
            step.update(size=crop)
    for split in ('val', 'test'):
        cfg.data[split].pipeline[1].img_scale = image_scale
    for split in ('train', 'val', 'test'):
        cfg.data[split].data_root = osp.abspath(args.data)
    cfg.data.samples_per_gpu = args.batch
    cfg.data.workers_per_gpu = args.workers
    cfg.optimizer = dict(type='AdamW', lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    cfg.optimizer_config = dict()
    cfg.lr_config = dict(policy='poly', warmup='linear', warmup_iters=args.warmup, warmup_ratio=1e-6, power=1.0,
                         min_lr=0.0, by_epoch=False)
    cfg.runner = dict(type='IterBasedRunner', max_iters=args.iters)
    cfg.checkpoint_config = dict(by_epoch=False, interval=args.iters, max_keep_ckpts=1)
    cfg.log_config = dict(interval=args.log_every, hooks=[dict(type='TextLoggerHook', by_epoch=False)])
    cfg.evaluation = dict(interval=args.eval_every, metric='mIoU')
    cfg.work_dir = osp.abspath(args.work_dir)
    cfg.seed = args.seed
    cfg.gpu_ids = []
    return cfg


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--data', required=True, help='dataset in the reference layout (images/, labels/)')
    p.add_argument('--work-dir', required=True)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--iters', type=int, default=1500)
    p.add_argument('--batch', type=int, default=4)
    p.add_argument('--lr', type=float, default=2e-3)
    p.add_argument('--weight-decay', type=float, default=1e-4)
    p.add_argument('--warmup', type=int, default=50)
    p.add_argument('--log-every', type=int, default=50)
    p.add_argument('--eval-every', type=int, default=500)
    p.add_argument('--workers', type=int, default=1, help='data loader worker processes')
    p.add_argument('--threads', type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = build_config(args)
    mmcv.mkdir_or_exist(cfg.work_dir)
    cfg.dump(osp.join(cfg.work_dir, 'config.py'))
    set_random_seed(args.seed)
    model = build_train_model(copy.deepcopy(cfg), train_cfg=cfg.get('train_cfg'), test_cfg=cfg.get('test_cfg'))
    model.init_weights()
    dataset = build_dataset(cfg.data.train)
    loader = build_dataloader(dataset, cfg.data.samples_per_gpu, cfg.data.workers_per_gpu, 1, dist=False,
                              seed=cfg.seed, drop_last=True)
    model = MMDataParallel(model, device_ids=None)          # CPU: no device ids
    optimizer = build_optimizer(model, cfg.optimizer)
    from mmseg.utils import get_root_logger
    logger = get_root_logger(log_file=osp.join(cfg.work_dir, 'train.log'))
    runner = build_runner(cfg.runner, default_args=dict(model=model, batch_processor=None, optimizer=optimizer,
                                                        work_dir=cfg.work_dir, logger=logger, meta=dict()))
    runner.timestamp = time.strftime('%Y%m%d_%H%M%S', time.localtime())
    runner.register_training_hooks(cfg.lr_config, cfg.optimizer_config, cfg.checkpoint_config, cfg.log_config)
    val_dataset = build_dataset(cfg.data.val, dict(test_mode=True))
    val_loader = build_dataloader(val_dataset, samples_per_gpu=1, workers_per_gpu=cfg.data.workers_per_gpu,
                                  dist=False, shuffle=False)
    runner.register_hook(LesionEvalHook(val_loader, by_epoch=False, interval=cfg.evaluation['interval'], metric='mIoU'),
                         priority='LOW')
    t0 = time.time()
    runner.run([loader], [('train', 1)])
    seconds = time.time() - t0
    # Final metrics on the test split, with the original's own evaluation (lesion_metric.py).
    results = single_gpu_test(model, val_loader, show=False)
    out = {'seed': args.seed, 'iters': args.iters, 'train_seconds': seconds, 'lesions': list(LESIONS),
           **lesion_scores(results, val_dataset)}
    with open(osp.join(cfg.work_dir, 'final_metrics.json'), 'w') as f:
        json.dump(out, f, indent=2)
    print(json.dumps(out))


if __name__ == '__main__':
    main()
