#!/usr/bin/env python
"""Float64 fixtures of the ORIGINAL HRDecoder / Efficient-HRDecoder / FCN, for the parity tests.

A development tool beside the project (never imported by it), run with the original's interpreter (the
environment ``setup_original.sh`` builds; ``tests/fixtures/README.md`` gives the exact commands):

  $HRD_ORIGINAL/venv/bin/python launch/reference/export_variants.py --config efficient --width 4 \\
      --visual-dim 8 --out OUT.npz

Builds the model from the original's own config file (hrdecoder / efficient / fcn) through ``original.py``:
any HRNet width, shallow depth, BN instead of SyncBN, the original's seeded init and one BN calibration pass
on the seeded image of ``seed + 1`` (or the float32 weights ``state/<key>`` of an earlier output,
``--state-from``). Then, in float64: the eval ``encode_decode`` logits, one ``forward_train`` with seeded crop
draws (recorded), every parameter's gradient and every BN running statistic after that forward. Saves the
float32 state_dict as ``state/<key>`` (exactly the weights the float64 run starts from) and the outputs.
"""
import argparse
import json
import os

import original


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--original", default=None, help="the folder setup_original.sh made (default: $HRD_ORIGINAL)")
    p.add_argument("--config", choices=sorted(original.CONFIG_FILES), required=True)
    p.add_argument("--width", type=int, default=8)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--hr-scale", type=int, default=64)
    p.add_argument("--crop-num", type=int, default=2)
    p.add_argument("--blocks", type=int, default=1)
    p.add_argument("--modules", type=int, default=1)
    p.add_argument("--visual-dim", type=int, default=16, help="Efficient-HRDecoder's compressed width")
    p.add_argument("--seed", type=int, default=0, help="init, calibration (seed + 1) and input seed")
    p.add_argument("--train-seed", type=int, default=0, help="numpy / torch seed right before forward_train")
    p.add_argument("--input-kind", choices=["randn", "uint8"], default="randn")
    p.add_argument("--state-from", default=None, help="take the weights from the state/<key> arrays of this "
                   "earlier output instead of the seeded init + calibration (reruns exactly its float64 part)")
    p.add_argument("--no-grads", action="store_true", help="skip the gradients (large models)")
    p.add_argument("--no-state", action="store_true", help="do not store the weights (save a .pth instead)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    original.activate(a.original)
    import numpy as np
    import torch
    torch.set_num_threads(a.threads)

    cfg = original.load_config(a.config, a.width, blocks=a.blocks, modules=a.modules, hr_scale=a.hr_scale,
                               crop_num=a.crop_num, visual_dim=a.visual_dim)
    n, h, w = 1, a.size, a.size
    metas = original.image_metas(n, h, w)
    model = original.build(cfg, a.seed)
    if a.state_from:
        with np.load(a.state_from) as earlier:
            model.load_state_dict({k[len("state/"):]: torch.from_numpy(np.array(earlier[k]))
                                   for k in earlier.files if k.startswith("state/")})
    else:
        calib = torch.from_numpy(original.seeded_input(a.seed + 1, (n, 3, h, w), a.input_kind)[0])
        original.calibrate_bn(model, calib, metas, 1)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    image_np = original.seeded_input(a.seed, (n, 3, h, w), a.input_kind)[0]
    image = torch.from_numpy(image_np.astype(np.float64))
    label = original.seeded_label(a.seed, (n, 1, h, w))
    meta = dict(config=a.config, config_file=original.CONFIG_FILES[a.config], width=a.width, size=[h, w],
                hr_scale=[a.hr_scale, a.hr_scale], crop_num=a.crop_num, blocks=a.blocks, modules=a.modules,
                visual_dim=a.visual_dim if a.config == "efficient" else None, seed=a.seed,
                train_seed=a.train_seed, input_kind=a.input_kind, num_params=original.count_params(model),
                torch=torch.__version__)
    out = {"meta": np.array(json.dumps(meta))}
    if a.no_state:
        torch.save(state, a.out.replace(".npz", "_state_dict.pth"))
    else:
        out.update({f"state/{k}": v.numpy() for k, v in state.items()})
    out["input"] = image_np
    out["train_label"] = label.astype(np.uint8)

    model = model.double().eval()
    with torch.no_grad():
        out["logits"] = model.encode_decode(image, metas).numpy()
    tmodel = original.build(cfg, a.seed)
    tmodel.load_state_dict(state)
    tmodel = tmodel.double().train()
    with original.float64_losses():
        losses, total, draws = original.train_forward(tmodel, image, metas, torch.from_numpy(label), a.train_seed)
        if not a.no_grads:
            total.backward()
    out["train_crop_boxes"] = np.asarray(draws["boxes"], np.int64).reshape(-1, 4)
    out.update({f"train_loss/{k}": v.detach().numpy() for k, v in losses.items()})
    out["train_loss/total"] = total.detach().numpy()
    if not a.no_grads:
        out.update({f"train_grad/{k}": q.grad.numpy() for k, q in tmodel.named_parameters() if q.grad is not None})
    out.update({f"train_buffer/{k}": v.numpy() for k, v in tmodel.state_dict().items() if "running_" in k})
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    np.savez(a.out, **out)
    print(json.dumps(dict(out=a.out, loss=float(total), boxes=draws["boxes"],
                          grads=sum(k.startswith("train_grad/") for k in out), **meta)))


if __name__ == "__main__":
    main()
