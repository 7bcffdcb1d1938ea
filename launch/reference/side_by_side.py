#!/usr/bin/env python
"""Time hrdecoder-jax against the original PyTorch HRDecoder in one run, interleaved, and print the ratios.

A development tool (never imported by the package): ours runs as ``python -m hrdecoder_jax.benchmark``,
theirs through the reference harness ``ref_hrdecoder.py --mode time`` with the original's interpreter.
Rounds alternate ours / theirs for every row, so both see the same machine load; each process reports the
median of its timed repetitions after its warm-up, and the table gives the median over rounds.

  python launch/reference/side_by_side.py --reference-python REF_VENV/bin/python \\
      --reference-harness PATH/TO/ref_hrdecoder.py [--rows w18_infer,w18_train,w48_infer,w48_train]
      [--rounds 3] [--repeats 5] [--json out.json]

Rows (HRDecoder, batch 1, float32, ``--threads`` for PyTorch; JAX uses every core of the machine):
  wXX_infer   eval forward (encode_decode) of a 1024 x 1024 image, hr_scale 512
  wXX_train   one train step (forward_train + backward + SGD) on 512 x 512, hr_scale 256, 2 crops
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]
ROWS = {
    "infer": dict(ours=["--what", "infer", "--image_size", "1024,1024", "--hr_scale", "512"],
                  theirs=["--what", "infer", "--size", "1024", "--hr-scale", "512"],
                  our_key="infer_median_s", their_what="infer"),
    "train": dict(ours=["--what", "train", "--image_size", "512,512", "--hr_scale", "256"],
                  theirs=["--what", "train", "--size", "512", "--hr-scale", "256", "--crop-num", "2"],
                  our_key="train_step_median_s", their_what="train_step"),
}


def _last_json(text: str, what: str | None = None) -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            d = json.loads(line)
            if what is None or d.get("what") == what:
                return d
    raise RuntimeError(f"no JSON result in:\n{text[-2000:]}")


def run_ours(width: int, kind: str, repeats: int) -> dict:
    cmd = [sys.executable, "-m", "hrdecoder_jax.benchmark", "--config", str(REPO / "configs" / "idrid.py"),
           "--width", str(width), "--repeats", str(repeats), *ROWS[kind]["ours"]]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True)
    return _last_json(out.stdout)


def run_theirs(python: str, harness: str, width: int, kind: str, repeats: int, threads: int) -> dict:
    cmd = [python, "-W", "ignore", harness, "--mode", "time", "--width", str(width), "--warmup", "2",
           "--runs", str(repeats), "--threads", str(threads), *ROWS[kind]["theirs"]]
    out = subprocess.run(cmd, cwd=os.path.dirname(os.path.abspath(harness)), capture_output=True, text=True,
                         check=True)
    return _last_json(out.stdout, ROWS[kind]["their_what"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reference-python", required=True, help="interpreter of the original code's environment")
    p.add_argument("--reference-harness", required=True, help="path of ref_hrdecoder.py")
    p.add_argument("--rows", default="w18_infer,w18_train,w48_infer,w48_train")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions per process")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="PyTorch threads")
    p.add_argument("--json", default=None)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    for r in rows:
        if not (r[:1] == "w" and "_" in r and r.split("_")[1] in ROWS and r[1:].split("_")[0].isdigit()):
            p.error(f"unknown row {r!r}; rows are w18_infer, w18_train, w48_infer, w48_train")
    times = {r: {"ours": [], "theirs": []} for r in rows}
    for k in range(args.rounds):
        for r in rows:
            width, kind = int(r[1:].split("_")[0]), r.split("_")[1]
            ours = run_ours(width, kind, args.repeats)[ROWS[kind]["our_key"]]
            theirs = run_theirs(args.reference_python, args.reference_harness, width, kind, args.repeats,
                                args.threads)["median_s"]
            times[r]["ours"].append(ours)
            times[r]["theirs"].append(theirs)
            print(f"[round {k + 1}/{args.rounds}] {r}: ours {ours:.3f} s, original {theirs:.3f} s", flush=True)
    print(f"\n| row | hrdecoder-jax | original PyTorch | ratio (ours / original) |\n|---|---:|---:|---:|")
    summary = {}
    for r in rows:
        o, t = statistics.median(times[r]["ours"]), statistics.median(times[r]["theirs"])
        ratios = [a / b for a, b in zip(times[r]["ours"], times[r]["theirs"])]
        summary[r] = {"ours_s": o, "original_s": t, "ratio": statistics.median(ratios), "rounds": times[r]}
        print(f"| {r} | {o:.3f} s | {t:.3f} s | {statistics.median(ratios):.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
