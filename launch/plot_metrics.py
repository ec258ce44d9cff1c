#!/usr/bin/env python3
"""Plot train and held-out loss against step from one or more Tessera run directories.

Usage: plot_metrics.py RUN_DIR [RUN_DIR ...] [--out PNG] [--label NAME ...] [--key loss]

Reads RUN_DIR/metrics.jsonl (one JSON object per line). Train loss is drawn as a thin,
semi-transparent line; held-out loss (`val_loss`) as markers joined by a line.
"""
import argparse
import json
import math
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def number(v):
    """Return v as a finite float, or None."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def read_run(run_dir, key, val_key="val_loss", x_key="step"):
    """Return ([(step, train)], [(step, val)]) from run_dir/metrics.jsonl."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        sys.exit(f"plot_metrics: {path}: no such file")
    train, val = [], []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                print(f"plot_metrics: warning: {path}:{lineno}: skipped, {e.msg}", file=sys.stderr)
                continue
            if not isinstance(rec, dict):
                print(f"plot_metrics: warning: {path}:{lineno}: skipped, not a JSON object",
                      file=sys.stderr)
                continue
            step = number(rec.get(x_key))
            if step is None:
                continue
            kind = rec.get("kind")
            v = number(rec.get(val_key))
            if v is None and kind == "eval":  # an eval record may carry its loss under `key`
                v = number(rec.get(key))
            if v is not None:
                val.append((step, v))
            t = number(rec.get(key))
            if t is not None and kind != "eval":
                train.append((step, t))
    if not train and not val:
        sys.exit(f"plot_metrics: {path}: no '{key}' or '{val_key}' values")
    return sorted(train), sorted(val)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR")
    ap.add_argument("--out", help="output PNG (default RUN_DIR/loss.png for a single run)")
    ap.add_argument("--label", nargs="+", help="legend label per run (default: directory name)")
    ap.add_argument("--key", default="loss", help="train metric to plot (default: loss; 'none' for held-out only)")
    ap.add_argument("--val-key", default="val_loss", help="held-out metric (default: val_loss; or val_nats_per_byte)")
    ap.add_argument("--x", default="step", help="x axis: step (default), tokens or elapsed_s")
    args = ap.parse_args()

    if args.label and len(args.label) != len(args.runs):
        ap.error(f"--label: got {len(args.label)} labels for {len(args.runs)} runs")
    if args.out is None:
        if len(args.runs) > 1:
            ap.error("--out is required with several runs")
        args.out = os.path.join(args.runs[0], "loss.png")
    labels = args.label or [os.path.basename(os.path.normpath(r)) or r for r in args.runs]

    fig, ax = plt.subplots(figsize=(9, 5.5), dpi=120)
    for i, (run, label) in enumerate(zip(args.runs, labels)):
        train, val = read_run(run, args.key, args.val_key, args.x)
        color = f"C{i % 10}"
        if train:
            ax.plot(*zip(*train), color=color, lw=0.8, alpha=0.45, label=f"{label} train")
        if val:
            ax.plot(*zip(*val), color=color, lw=1.6, marker="o", ms=4, label=f"{label} held-out")
    ax.set_xlabel({"elapsed_s": "training time (s)"}.get(args.x, args.x))
    ax.set_ylabel("nats per byte" if args.val_key == "val_nats_per_byte"
                  else "loss (nats/token)" if args.key in ("loss", "none") else args.key)
    ax.set_title(("Loss" if args.key in ("loss", "none") else args.key) + ": " + ", ".join(labels))
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig.savefig(args.out)
    print(args.out)


if __name__ == "__main__":
    main()
