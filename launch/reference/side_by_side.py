#!/usr/bin/env python
"""Time hrdecoder-jax against the original PyTorch HRDecoder in one run, interleaved, and print the ratios.

A development tool (never imported by the package): ours runs as ``python -m hrdecoder_jax.benchmark``,
theirs through ``original.py time`` (beside this file) with the original's interpreter, the environment
``setup_original.sh`` builds in ``$HRD_ORIGINAL`` (or ``--original DIR``).
Rounds alternate ours / theirs for every row, so both see the same machine load; each process reports the
median of its timed repetitions after its warm-up, and the table gives the median over rounds.

  python launch/reference/side_by_side.py [--original DIR] [--rows w18_infer,w18_train,w18_train_b4,...]
      [--rounds 3] [--repeats 5] [--json out.json]

Rows (HRDecoder, float32, ``--threads`` for PyTorch; JAX uses every core of the machine); ``_bN`` sets the
batch of a train row (default 1). The table names the CPU (``/proc/cpuinfo``): ratios differ between CPUs.
  wXX_infer     eval forward (encode_decode) of a 1024 x 1024 image, hr_scale 512
  wXX_train[_bN] one train step (forward_train + backward + SGD) on N images of 512 x 512, hr_scale 256,
                2 crops
  wXX_onnx      the infer row's function exported to ONNX (``deploy_bench.py --what onnx``: uint8 image,
                normalisation, forward, sigmoid) in ONNX Runtime on the CPU, beside our compiled function and
                the original's encode_decode of the same size
  wXX_fullsize  predict one IDRiD-size photograph (4288 x 2848; resize to 2880 x 1920, slide 1920 / 960,
                hr_scale 960, back to the photo's size, sigmoid): ours ``deploy_bench.py --what fullsize``,
                the original's test pipeline + ``inference`` (``full_size_original.py``); time by stage and
                each process's peak resident memory (not in the default rows: minutes per round)
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
sys.path.insert(0, str(REPO / "launch" / "reference"))    # loaded by path too (the docs' command test)
import original  # noqa: E402  (launch/reference/original.py: only its path helpers run in this process)

ROWS = {
    "infer": dict(ours=["--what", "infer", "--image_size", "1024,1024", "--hr_scale", "512"],
                  theirs=["--what", "infer", "--size", "1024", "--hr-scale", "512"],
                  our_key="infer_median_s", their_what="infer"),
    "train": dict(ours=["--what", "train", "--image_size", "512,512", "--hr_scale", "256"],
                  theirs=["--what", "train", "--size", "512", "--hr-scale", "256", "--crop-num", "2"],
                  our_key="train_step_median_s", their_what="train_step"),
    "onnx": dict(ours=["--what", "onnx", "--size", "1024", "--hr-scale", "512"],
                 theirs=["--what", "infer", "--size", "1024", "--hr-scale", "512"],
                 our_key="ours_s", their_what="infer"),
    "fullsize": dict(ours=["--what", "fullsize"], theirs=[], our_key="median_s", their_what="fullsize"),
}
DEPLOY_BENCH = REPO / "launch" / "reference" / "deploy_bench.py"
FULL_SIZE_ORIGINAL = REPO / "launch" / "reference" / "full_size_original.py"
ORIGINAL = REPO / "launch" / "reference" / "original.py"


def _last_json(text: str, what: str | None = None) -> dict:
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            d = json.loads(line)
            if what is None or d.get("what") == what:
                return d
    raise RuntimeError(f"no JSON result in:\n{text[-2000:]}")


def _run(cmd: list[str], cwd) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"{' '.join(map(str, cmd))} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out


def parse_row(row: str) -> tuple[int, str, int]:
    """``w18_train_b4`` -> (18, 'train', 4); ValueError for anything else (a batch only on train rows)."""
    parts = row.split("_")
    if (len(parts) not in (2, 3) or parts[0][:1] != "w" or not parts[0][1:].isdigit() or parts[1] not in ROWS
            or (len(parts) == 3 and not (parts[1] == "train" and parts[2][:1] == "b" and parts[2][1:].isdigit()
                                         and int(parts[2][1:]) > 0))):
        raise ValueError(row)
    return int(parts[0][1:]), parts[1], int(parts[2][1:]) if len(parts) == 3 else 1


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        import platform
        return platform.processor() or platform.machine()


def run_ours(width: int, kind: str, repeats: int, batch: int = 1) -> dict:
    if kind in ("onnx", "fullsize"):
        cmd = [sys.executable, str(DEPLOY_BENCH), "--width", str(width), "--repeats", str(repeats),
               *ROWS[kind]["ours"]]
    else:
        cmd = [sys.executable, "-m", "hrdecoder_jax.benchmark", "--config", str(REPO / "configs" / "idrid.py"),
               "--width", str(width), "--repeats", str(repeats), "--batch", str(batch), *ROWS[kind]["ours"]]
    out = _run(cmd, REPO)
    return _last_json(out.stdout)


def run_theirs(python: str, root: str, width: int, kind: str, repeats: int, threads: int,
               batch: int = 1) -> dict:
    if kind == "fullsize":
        cmd = [python, "-W", "ignore", str(FULL_SIZE_ORIGINAL), "--original", root,
               "--width", str(width), "--repeats", str(repeats), "--threads", str(threads)]
        out = _run(cmd, REPO)
        return _last_json(out.stdout, "fullsize")
    cmd = [python, "-W", "ignore", str(ORIGINAL), "--original", root, "--threads", str(threads), "time",
           "--width", str(width), "--warmup", "2", "--runs", str(repeats), "--batch", str(batch),
           *ROWS[kind]["theirs"]]
    out = _run(cmd, REPO)
    return _last_json(out.stdout, ROWS[kind]["their_what"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    original.add_location_arguments(p)
    p.add_argument("--rows", default="w18_infer,w48_infer,w18_train,w18_train_b4,w48_train,w48_train_b4")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5, help="timed repetitions per process")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="PyTorch threads")
    p.add_argument("--json", default=None)
    return p


def main(argv=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    root, python = original.located(args)
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    for r in rows:
        try:
            parse_row(r)
        except ValueError:
            p.error(f"unknown row {r!r}; rows are wXX_infer, wXX_train[_bN], wXX_onnx, wXX_fullsize (XX: 18 or 48)")
    cpu = cpu_model()
    print(f"CPU: {cpu} ({os.cpu_count()} cores); PyTorch threads {args.threads}", flush=True)
    times = {r: {"ours": [], "theirs": [], "ours_json": [], "theirs_json": []} for r in rows}
    for k in range(args.rounds):
        for r in rows:
            width, kind, batch = parse_row(r)
            ours_json = run_ours(width, kind, args.repeats, batch)
            theirs_json = run_theirs(python, root, width, kind, args.repeats, args.threads, batch)
            ours, theirs = ours_json[ROWS[kind]["our_key"]], theirs_json["median_s"]
            for key, v in (("ours", ours), ("theirs", theirs), ("ours_json", ours_json), ("theirs_json", theirs_json)):
                times[r][key].append(v)
            extra = f", ONNX Runtime {ours_json['onnxruntime_s']:.3f} s" if kind == "onnx" else ""
            print(f"[round {k + 1}/{args.rounds}] {r}: ours {ours:.3f} s, original {theirs:.3f} s{extra}", flush=True)
    print(f"\nCPU: {cpu}; {args.rounds} interleaved rounds, medians")
    print("\n| row | hrdecoder-jax | original PyTorch | ratio (ours / original) |\n|---|---:|---:|---:|")
    summary = {"cpu": cpu}
    for r in rows:
        o, t = statistics.median(times[r]["ours"]), statistics.median(times[r]["theirs"])
        ratios = [a / b for a, b in zip(times[r]["ours"], times[r]["theirs"])]
        summary[r] = {"ours_s": o, "original_s": t, "ratio": statistics.median(ratios), "rounds": times[r]["ours"],
                      "original_rounds": times[r]["theirs"], "ours_json": times[r]["ours_json"],
                      "original_json": times[r]["theirs_json"]}
        print(f"| {r} | {o:.3f} s | {t:.3f} s | {statistics.median(ratios):.2f} |")
    onnx_rows = [r for r in rows if r.endswith("_onnx")]
    if onnx_rows:
        print("\n| row | hrdecoder-jax (XLA) | ONNX Runtime | original PyTorch | ORT / ours | ORT / original | "
              "max abs diff of probabilities |\n|---|---:|---:|---:|---:|---:|---:|")
        for r in onnx_rows:
            ort_s = statistics.median(j["onnxruntime_s"] for j in times[r]["ours_json"])
            o, t = summary[r]["ours_s"], summary[r]["original_s"]
            diff = max(j["max_abs_prob_diff"] for j in times[r]["ours_json"])
            summary[r]["onnxruntime_s"] = ort_s
            print(f"| {r} | {o:.3f} s | {ort_s:.3f} s | {t:.3f} s | {ort_s / o:.2f} | {ort_s / t:.2f} | {diff:.1e} |")
    full_rows = [r for r in rows if r.endswith("_fullsize")]
    if full_rows:
        print("\n| row | implementation | total | preprocess | windows | blend + resize + sigmoid / to photo | "
              "first call | peak RSS |\n|---|---|---:|---:|---:|---:|---:|---:|")
        for r in full_rows:
            for name, js in (("hrdecoder-jax", times[r]["ours_json"]), ("original", times[r]["theirs_json"])):
                st = {k: statistics.median(j["stages_median_s"][k] for j in js) for k in js[0]["stages_median_s"]}
                rest = st.get("to_photo", st.get("blend_resize_sigmoid", float("nan")))
                peak = max(j["peak_rss_mib"] for j in js)
                first = statistics.median(j["first_call_s"] for j in js)
                print(f"| {r} | {name} | {st['total']:.2f} s | {st['preprocess']:.2f} s | {st['windows']:.2f} s | "
                      f"{rest:.2f} s | {first:.1f} s | {peak / 1024:.2f} GiB |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
