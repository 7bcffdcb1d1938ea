#!/usr/bin/env python
"""Compare a re-exported fixture with the committed one, array by array (NumPy only; any interpreter).

  python launch/reference/compare_fixtures.py tests/fixtures/NAME.npz OUT/NAME.npz [--tol 1e-12]

Prints one line per array that is not bit-identical (largest absolute difference, and relative to the
committed array's largest magnitude), then a summary line with the largest of each. ``meta`` is compared as
parsed JSON; integer arrays (crop boxes, labels) must be equal; NaNs must sit at the same places. Exit
status 1 when the key sets, shapes, dtypes, integers or NaN patterns differ, or a relative difference
exceeds ``--tol`` (default: no limit, report only).
"""
import argparse
import json
import sys

import numpy as np


def compare(committed: str, fresh: str, tol: float | None, quiet: bool = False) -> int:
    a, b = np.load(committed), np.load(fresh)
    problems = []
    if set(a.files) != set(b.files):
        problems.append(f"keys only in {committed}: {sorted(set(a.files) - set(b.files))[:8]}; "
                        f"only in {fresh}: {sorted(set(b.files) - set(a.files))[:8]}")
    worst_abs, worst_rel, worst_key, identical = 0.0, 0.0, None, 0
    keys = [k for k in a.files if k in set(b.files)]
    for k in keys:
        x, y = a[k], b[k]
        if k == "meta":
            if json.loads(str(x)) != json.loads(str(y)):
                problems.append(f"meta differs: {str(x)} vs {str(y)}")
            else:
                identical += 1
            continue
        if x.shape != y.shape or x.dtype != y.dtype:
            problems.append(f"{k}: {x.shape} {x.dtype} vs {y.shape} {y.dtype}")
            continue
        if x.dtype.kind not in "fc":
            if np.array_equal(x, y):
                identical += 1
            else:
                problems.append(f"{k}: values differ")
            continue
        if not np.array_equal(np.isnan(x), np.isnan(y)):
            problems.append(f"{k}: NaNs at other places")
            continue
        if np.array_equal(x, y, equal_nan=True):
            identical += 1
            continue
        d = float(np.nanmax(np.abs(x - y)))
        scale = float(np.nanmax(np.abs(x)))
        rel = d / scale if scale else float("inf")
        if not quiet:
            print(f"  {k}: max abs {d:.3g}, relative {rel:.3g}")
        if rel > worst_rel:
            worst_rel, worst_key = rel, k
        worst_abs = max(worst_abs, d)
        if tol is not None and rel > tol:
            problems.append(f"{k}: relative difference {rel:.3g} > {tol:g}")
    for p in problems:
        print("  PROBLEM", p)
    print(f"{fresh}: {len(keys)} arrays, {identical} bit-identical; largest difference {worst_abs:.3g} absolute, "
          f"{worst_rel:.3g} relative ({worst_key})")
    return 1 if problems else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("committed")
    p.add_argument("fresh")
    p.add_argument("--tol", type=float, default=None, help="largest allowed relative difference")
    p.add_argument("--quiet", action="store_true", help="only problems and the summary")
    a = p.parse_args(argv)
    return compare(a.committed, a.fresh, a.tol, a.quiet)


if __name__ == "__main__":
    sys.exit(main())
