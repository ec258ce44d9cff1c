"""ckpt_equal.py A.h5 B.h5 [--rtol R [--rtol-for REGEX R2]...]: exit 0 when the two Tessera checkpoints hold bitwise identical model/* and
optim/* datasets (same names, dtypes, shapes and bytes) and the same step, seed, optimizer step count and data
fingerprint; otherwise print each difference and exit 1. With --rtol R, float datasets may differ by at most
R * max|B| (per dataset: max |A - B| / max |B|), as runs whose sums are ordered differently do (parallel layouts);
datasets whose name matches REGEX (re.search) by R2 instead (the first match)."""
import re
import sys

import h5py
import numpy as np


def datasets(f):
    out = {}

    def visit(name, obj):
        if isinstance(obj, h5py.Dataset) and name.split("/")[0] in ("model", "optim"):
            out[name] = obj[()]

    f.visititems(visit)
    return out


def main(a_path, b_path, rtol=None, rtol_for=()):
    diffs = []
    worst = [0.0]
    worst_for = {}  # REGEX -> the worst relative difference among the datasets it applies to
    with h5py.File(a_path, "r") as fa, h5py.File(b_path, "r") as fb:
        a, b = datasets(fa), datasets(fb)
        if not any(n.startswith("model/") for n in a) or not any(n.startswith("optim/") for n in a):
            diffs.append(f"{a_path}: no model/* or no optim/* datasets")
        for name in sorted(set(a) | set(b)):
            if name not in a or name not in b:
                diffs.append(f"{name}: only in {a_path if name in a else b_path}")
                continue
            x, y = a[name], b[name]
            if x.dtype != y.dtype or x.shape != y.shape:
                diffs.append(f"{name}: {x.dtype}{x.shape} vs {y.dtype}{y.shape}")
            elif rtol is not None and np.issubdtype(x.dtype, np.floating):
                x64, y64 = x.astype(np.float64), y.astype(np.float64)
                scale = max(float(np.max(np.abs(y64))) if y64.size else 0.0, 1e-30)
                rel = float(np.max(np.abs(x64 - y64))) / scale if x64.size else 0.0
                group, limit = next(((pattern, r) for pattern, r in rtol_for if re.search(pattern, name)), (None, rtol))
                if group is None:
                    worst[0] = max(worst[0], rel)
                else:
                    worst_for[group] = max(worst_for.get(group, 0.0), rel)
                if not rel <= limit:
                    diffs.append(f"{name}: max |diff| / max |B| = {rel:.3g} > {limit:g}")
            elif not np.array_equal(x, y) or x.tobytes() != y.tobytes():
                n = int(np.count_nonzero(x.view(np.uint8) != y.view(np.uint8)))
                diffs.append(f"{name}: {n} differing bytes (max |diff| {np.max(np.abs(x - y)):.3g})")
        for key in ("step", "seed", "optim.steps", "data.fingerprint"):
            va, vb = fa.attrs.get(key), fb.attrs.get(key)
            if va is None or vb is None or va != vb:
                diffs.append(f"attribute {key}: {va} vs {vb}")
        print(f"compared {len(a)} datasets of {a_path} and {b_path}" +
              (f"; worst relative difference {worst[0]:.3g} (limit {rtol:g})" if rtol is not None else "") +
              "".join(f"; {pattern}: worst {worst_for.get(pattern, 0.0):.3g} (limit {r:g})" for pattern, r in rtol_for))
    for d in diffs:
        print("  differs:", d)
    return 1 if diffs else 0


if __name__ == "__main__":
    args = sys.argv[1:]
    rtol, rtol_for = None, []
    while len(args) > 2:
        if args[2] == "--rtol" and len(args) >= 4:
            rtol, args = float(args[3]), args[:2] + args[4:]
        elif args[2] == "--rtol-for" and len(args) >= 5 and rtol is not None:
            rtol_for.append((args[3], float(args[4])))
            args = args[:2] + args[5:]
        else:
            sys.exit(__doc__)
    if len(args) != 2:
        sys.exit(__doc__)
    sys.exit(main(args[0], args[1], rtol, rtol_for))
