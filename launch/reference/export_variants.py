#!/usr/bin/env python
"""Float64 fixtures of the ORIGINAL HRDecoder / Efficient-HRDecoder / FCN, for the parity tests.

A development tool beside the project (never imported by it): it runs with the interpreter of the original
code's environment and uses the reference harness ``ref_hrdecoder.py`` (the folder holding it must be on
``PYTHONPATH``; ``tests/fixtures/README.md`` gives the exact commands):

  REF_PYTHON launch/reference/export_variants.py --config efficient --width 4 --visual-dim 8 --out OUT.npz

Builds the model from the repository's own config file (hrdecoder / efficient / fcn), any HRNet width,
shallow depth, BN instead of SyncBN, reference init + one BN calibration pass (as ref_hrdecoder.py),
then runs in float64: eval encode_decode logits, one forward_train with seeded crop draws (recorded),
every parameter gradient, every BN running statistic after the train forward. Saves the float32
state_dict as state/<key> (the weights the float64 run starts from, exactly), and the outputs.
"""
import argparse, copy, json, os.path as osp, sys
import ref_hrdecoder as R
import numpy as np
import torch
from mmcv import Config

CONFIGS = {
    'hrdecoder': 'configs/lesion/hrdecoder_fcn_hr48_idrid_2880x1920-slide.py',
    'efficient': 'configs/lesion/efficient-hrdecoder_fcn_hr48_idrid_2880x1920-slide.py',
    'fcn': 'configs/lesion/fcn_hr48_idrid_1440x960.py',
}


def build_cfg(kind, width, hr_scale, crop_num, blocks, modules, visual_dim):
    cfg = Config.fromfile(osp.join(R.REPO, CONFIGS[kind]))
    m = cfg.model
    ch = {f'stage{s}': tuple(width * 2 ** i for i in range(s)) for s in (2, 3, 4)}
    for st in ('stage1', 'stage2', 'stage3', 'stage4'):
        e = m.backbone.extra[st]
        if blocks is not None:
            e.num_blocks = tuple([blocks] * len(e.num_blocks))
        if modules is not None:
            e.num_modules = modules
        if st != 'stage1':
            e.num_channels = ch[st]
    m.pretrained = None
    bn = dict(type='BN', requires_grad=True)
    m.backbone.norm_cfg = bn
    m.decode_head.norm_cfg = bn
    m.decode_head.num_classes = 4
    total = sum(ch['stage4'])
    if kind == 'fcn':
        m.decode_head.in_channels = list(ch['stage4'])
        m.decode_head.channels = total
    else:
        m.hr_settings.hr_scale = tuple(hr_scale)
        m.hr_settings.crop_num = crop_num
        if kind == 'efficient':
            m.hr_settings.in_channels = total
            m.hr_settings.visual_dim = visual_dim
            m.decode_head.in_channels = visual_dim
            m.decode_head.channels = visual_dim
        else:
            m.decode_head.in_channels = total
    return cfg


def main():
    p = argparse.ArgumentParser()
    p.add_argument('--config', choices=sorted(CONFIGS), required=True)
    p.add_argument('--width', type=int, default=8)
    p.add_argument('--size', type=int, default=128)
    p.add_argument('--hr-scale', type=int, default=64)
    p.add_argument('--crop-num', type=int, default=2)
    p.add_argument('--blocks', type=int, default=1)
    p.add_argument('--modules', type=int, default=1)
    p.add_argument('--visual-dim', type=int, default=16)
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--train-seed', type=int, default=0)
    p.add_argument('--input-kind', choices=['randn', 'uint8'], default='randn')
    p.add_argument('--no-grads', action='store_true', help='skip the gradients (large models)')
    p.add_argument('--no-state', action='store_true', help='do not store the weights (save a .pth instead)')
    p.add_argument('--out', required=True)
    a = p.parse_args()
    torch.set_num_threads(2)
    cfg = build_cfg(a.config, a.width, (a.hr_scale, a.hr_scale), a.crop_num, a.blocks, a.modules, a.visual_dim)
    model = R.build_model(cfg, a.seed)
    n, H, W = 1, a.size, a.size
    metas = R.img_metas_for(n, H, W)
    calib = torch.from_numpy(R.make_input(a.seed + 1, n, H, W, a.input_kind)[0])
    with torch.no_grad():
        R.calibrate_bn(model, calib, metas, 1)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    img_np, _ = R.make_input(a.seed, n, H, W, a.input_kind)
    x = torch.from_numpy(img_np.astype(np.float64))
    lab = R.make_label(a.seed, n, H, W)
    out = {}
    meta = dict(config=a.config, config_file=CONFIGS[a.config], width=a.width, size=[H, W],
                hr_scale=[a.hr_scale, a.hr_scale], crop_num=a.crop_num, blocks=a.blocks, modules=a.modules,
                visual_dim=a.visual_dim if a.config == 'efficient' else None, seed=a.seed,
                train_seed=a.train_seed, input_kind=a.input_kind,
                num_params=sum(p.numel() for p in model.parameters()), torch=torch.__version__)
    out['meta'] = np.array(json.dumps(meta))
    if not a.no_state:
        for k, v in sd.items():
            out[f'state/{k}'] = v.numpy()
    else:
        torch.save(sd, a.out.replace('.npz', '_state_dict.pth'))
    out['input'] = img_np
    out['train_label'] = lab.astype(np.uint8)
    model = model.double().eval()
    with torch.no_grad():
        out['logits'] = model.encode_decode(x, metas).numpy()
    tmodel = R.build_model(cfg, a.seed)
    tmodel.load_state_dict(sd)
    tmodel = tmodel.double().train()
    _float = torch.Tensor.float   # the reference's dice loss casts to float32: keep float64 here
    torch.Tensor.float = lambda self, *q, **k: self if self.dtype == torch.float64 else _float(self, *q, **k)
    np.random.seed(a.train_seed)
    torch.manual_seed(a.train_seed)
    with R.record_train_crops() as rec:
        losses = tmodel.forward_train(x, metas, torch.from_numpy(lab))
    loss, _ = tmodel._parse_losses(losses)
    if not a.no_grads:
        loss.backward()
    torch.Tensor.float = _float
    out['train_crop_boxes'] = np.asarray(rec['boxes'], np.int64).reshape(-1, 4)
    for k, v in losses.items():
        out[f'train_loss/{k}'] = v.detach().numpy()
    out['train_loss/total'] = loss.detach().numpy()
    if not a.no_grads:
        for k, q in tmodel.named_parameters():
            if q.grad is not None:
                out[f'train_grad/{k}'] = q.grad.numpy()
    for k, v in tmodel.state_dict().items():
        if 'running_' in k:
            out[f'train_buffer/{k}'] = v.numpy()
    np.savez(a.out, **out)
    print(json.dumps(dict(out=a.out, loss=float(loss), boxes=rec['boxes'],
                          grads=sum(k.startswith('train_grad/') for k in out), **meta)))


if __name__ == '__main__':
    main()
