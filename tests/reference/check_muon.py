#!/usr/bin/env python3
"""The independent oracle for Muon (DeepSeek-V4 Algorithm 1), written from the spec in PyTorch float32:

    M = mu M + G;  U = mu M + G (Nesterov) or M;  X = U / (||U||_F + 1e-7), per matrix
    if rows > cols: X = X^T;  N steps of X = a X + (b A + c A^2) X with A = X X^T;  transpose back
    O = X * update_rms * sqrt(max(rows, cols));  W = W (1 - lr wd) - lr O

Replays Tessera's gradients and learning rates from the initial weights and requires Tessera's weights after
every step, each step's update W_t - W_{t-1} and the final momentum to match with max relative error <= 1e-5
(max |diff| / max |reference|).

usage: check_muon.py DUMP_DIR   (DUMP_DIR written by the muon_dump program)"""
import math
import sys

import h5py
import numpy as np
import torch

from oracle import Checks, rel_err  # noqa: E402  (tests/reference/oracle.py)

TOL = 1e-5
SCHEDULES = {
    "v4": [(3.4445, -4.7750, 2.0315)] * 8 + [(2.0, -1.5, 0.5)] * 2,
    "original": [(3.4445, -4.7750, 2.0315)] * 5,
}


def orthogonalise(u, schedule):
    """Newton-Schulz on one matrix or on a (E, rows, cols) stack of independent matrices."""
    x = u / (torch.linalg.matrix_norm(u, ord="fro", keepdim=True) + 1e-7)
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    for a, b, c in SCHEDULES[schedule]:
        gram = x @ x.mT
        x = a * x + (b * gram + c * (gram @ gram)) @ x
    return x.mT if tall else x


def main(out):
    torch.set_num_threads(1)
    checks = Checks(TOL)
    check = checks.check

    with h5py.File(f"{out}/muon.h5", "r") as f:
        cases = sorted(f.keys())
        if not cases:
            checks.fail("no cases in the dump")
        for case in cases:
            g = f[case]
            mu = float(f.attrs[f"{case}.momentum"])
            nesterov = bool(f.attrs[f"{case}.nesterov"])
            wd = float(f.attrs[f"{case}.weight_decay"])
            update_rms = float(f.attrs[f"{case}.update_rms"])
            schedule = f.attrs[f"{case}.ns_schedule"]
            schedule = schedule.decode() if isinstance(schedule, bytes) else str(schedule)
            w = torch.from_numpy(g["w0"][()]).float()
            grads = torch.from_numpy(g["grads"][()]).float()
            lrs = g["lrs"][()]
            expected = g["weights"][()]
            rows, cols = w.shape[-2], w.shape[-1]
            scale = update_rms * math.sqrt(max(rows, cols))
            momentum = torch.zeros_like(w)
            print(f"{case}: {tuple(w.shape)} schedule={schedule} nesterov={nesterov} wd={wd} rms={update_rms}")
            previous = g["w0"][()].astype(np.float64)
            for step, lr in enumerate(lrs):
                grad = grads[step]
                momentum = mu * momentum + grad
                u = mu * momentum + grad if nesterov else momentum
                o = orthogonalise(u, schedule) * scale
                w = w * (1 - lr * wd) - lr * o
                check(f"{case} step {step + 1} weights", rel_err(expected[step], w.numpy()))
                # The step alone, from Tessera's previous weights (differences in float64): relative to the size
                # of the update rather than of the weights, so the orthogonalised update is checked sharply.
                ours = expected[step].astype(np.float64) - previous
                theirs = previous * (1 - lr * wd) - lr * o.double().numpy() - previous
                check(f"{case} step {step + 1} update", rel_err(ours, theirs))
                previous = expected[step].astype(np.float64)
            check(f"{case} final momentum", rel_err(g["momentum"][()], momentum.numpy()))

    return checks.exit_code()

if __name__ == "__main__":
    if len(sys.argv) != 2:
        print(__doc__)
        sys.exit(2)
    sys.exit(main(sys.argv[1]))
