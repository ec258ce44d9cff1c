#!/usr/bin/env python3
"""Analysis for bench/muon_vs_adamw.sh: sweep table, best lr per optimizer (lowest final val_loss), and the
first step at which the best Muon run's val_loss reaches the best AdamW run's final val_loss, found by linear
interpolation between evaluation points, as a fraction of AdamW's steps. Draws docs/img/muon-vs-adamw-<model>.png.
Usage: muon_vs_adamw.py RUNS_ROOT MODEL..."""
import glob, json, math, os, re, sys


def load(path):
    evals, last = [], None
    with open(path) as f:
        for line in f:
            d = json.loads(line)
            last = d
            if "val_loss" in d:
                evals.append((d["step"], d["val_loss"]))
    return evals, last


def reach_step(evals, target):
    """First (interpolated) step where val_loss <= target; None if never."""
    prev = None
    for s, v in evals:
        if v <= target:
            if prev is None:
                return float(s)
            ps, pv = prev
            return ps + (s - ps) * (pv - target) / (pv - v)
        prev = (s, v)
    return None


def main():
    root, models = sys.argv[1], sys.argv[2:]
    for model in models:
        runs = {}
        for d in sorted(glob.glob(os.path.join(root, f"{model}-*-lr*"))):
            m = re.match(rf"{re.escape(model)}-(adamw|muon)-lr(.+)$", os.path.basename(d))
            mp = os.path.join(d, "metrics.jsonl")
            if not m or not os.path.isfile(mp):
                continue
            evals, last = load(mp)
            runs[(m.group(1), float(m.group(2)))] = (m.group(2), evals, last)
        print(f"\n## {model}\n")
        print("| optimizer | lr | steps | tokens/step | final val_loss | wall s |")
        print("|---|---|---|---|---|---|")
        best = {}
        for (opt, lr), (lrs, evals, last) in sorted(runs.items()):
            fin = evals[-1][1] if evals else float("nan")
            ok = evals and evals[-1][0] == last["step"] and math.isfinite(fin)
            tps = last["tokens"] // last["step"]
            print(f"| {opt} | {lrs} | {last['step']} | {tps} | {fin:.4f} | {last['elapsed_s']:.0f} |")
            if ok and (opt not in best or fin < best[opt][1]):
                best[opt] = (lr, fin, evals, last["step"], lrs)
        if "adamw" not in best or "muon" not in best:
            print("missing runs"); continue
        a_lr, a_fin, a_ev, a_steps, a_lrs = best["adamw"]
        m_lr, m_fin, m_ev, m_steps, m_lrs = best["muon"]
        s = reach_step(m_ev, a_fin)
        print(f"\nbest AdamW lr {a_lrs}: final val_loss {a_fin:.4f} at step {a_steps}")
        print(f"best Muon  lr {m_lrs}: final val_loss {m_fin:.4f} at step {m_steps}")
        if s is None:
            print(f"Muon never reaches {a_fin:.4f}: fraction > {m_steps / a_steps:.2f}")
        else:
            print(f"Muon reaches AdamW's final val_loss {a_fin:.4f} at step {s:.1f} (linear interpolation "
                  f"between eval points) = {s / a_steps:.3f} of AdamW's {a_steps} steps "
                  f"({'meets' if s <= 0.75 * a_steps else 'does not meet'} the 75% target)")
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        ax.plot(*zip(*a_ev), "o-", ms=3, label=f"AdamW lr {a_lrs}")
        ax.plot(*zip(*m_ev), "o-", ms=3, label=f"Muon lr {m_lrs}")
        ax.axhline(a_fin, color="grey", ls=":", lw=1, label=f"AdamW final {a_fin:.3f}")
        if s is not None:
            ax.axvline(s, color="C1", ls="--", lw=1, label=f"Muon reaches it: step {s:.0f} ({s / a_steps:.0%})")
        ax.set_xlabel("step (equal tokens per step)")
        ax.set_ylabel("val_loss (nats/token)")
        ax.set_title(f"{model}: best-lr Muon vs AdamW")
        lo = min(min(v for _, v in a_ev), min(v for _, v in m_ev))
        ax.set_ylim(lo - 0.05, lo + 1.2)
        ax.legend()
        fig.tight_layout()
        out = f"docs/img/muon-vs-adamw-{model}.png"
        fig.savefig(out, dpi=110)
        print(f"wrote {out}")


if __name__ == "__main__":
    main()
