#!/usr/bin/env python3
"""The independent oracle for Tessera's DeepSeek-V4 model: recomputes, in float64 from the dumped parameter values,
the objective J, the main loss, the logits, the MTP logits and dJ/dparam of every trainable parameter with the
PyTorch formulation of v4_reference.py, and compares them with Tessera's dump (max |ours - ref| / max |ref| per
tensor). A gradient that is exactly zero in the reference (the indexer without its loss, an expert no token
chose) must be exactly zero (<= 1e-12 absolute) in the dump as well.

Dump (HDF5): attribute config_json (ModelConfig fields), optional attribute dtype ("f32" | "f64");
params/<name> (every parameter and buffer), batch/{ids,targets,doc} (B, T), out/{objective,loss} (1,),
out/logits (B, T, V), out/mtp_logits (B, T, V) when mtp_depth = 1, grads/<name> for every trainable parameter.

usage: check_v4.py DUMP [--tol T]   (default tolerance 1e-4 for f32 dumps, 1e-9 for f64 dumps)"""
import argparse
import json
import sys

import h5py
import numpy as np
import torch

import v4_reference as ref
from oracle import Checks, rel_err  # noqa: E402  (tests/reference/oracle.py)

ZERO_ABS = 1e-12


def _str(x):
    return x.decode() if isinstance(x, bytes) else str(x)


def load(path):
    with h5py.File(path, "r") as f:
        cfg = json.loads(_str(f.attrs["config_json"]))
        dtype = _str(f.attrs["dtype"]) if "dtype" in f.attrs else None
        params = {name: f["params"][name][()] for name in f["params"]}
        batch = {k: f["batch"][k][()] for k in ("ids", "targets", "doc")}
        out = {k: f["out"][k][()] for k in f["out"]}
        grads = {name: f["grads"][name][()] for name in f["grads"]} if "grads" in f else {}
    return cfg, dtype, params, batch, out, grads


def compare_grad(checks, name, ours, theirs):
    """ours = Tessera's dump, theirs = reference (float64)."""
    if ours.shape != theirs.shape:
        checks.fail(f"grad {name}: shape {ours.shape} in the dump, {theirs.shape} in the reference")
        return
    if not np.any(theirs):
        err = float(np.max(np.abs(ours))) if ours.size else 0.0
        checks.check(f"grad {name} (reference exactly zero; max |dump|)", err, ZERO_ABS)
        return
    checks.check(f"grad {name}", rel_err(ours, theirs))
    # Stacked experts: an expert that no token selected has an exactly zero gradient slice.
    if ".experts." in name:
        zero = [e for e in range(theirs.shape[0]) if not np.any(theirs[e])]
        if zero:
            err = float(np.max(np.abs(ours[zero])))
            checks.check(f"grad {name} experts {zero} (unselected; max |dump|)", err, ZERO_ABS)


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dump")
    ap.add_argument("--tol", type=float, default=None)
    ap.add_argument("--mtp-pad-id", type=int, default=ref.MTP_PAD_ID,
                    help="token id the MTP input uses at the last position of a row (default %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default %(default)s)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    cfg, dtype, params, batch, out, grads = load(args.dump)
    tol = args.tol if args.tol is not None else (1e-9 if dtype == "f64" else 1e-4)
    checks = Checks(tol)
    print(f"dump {args.dump}: dtype {dtype or 'unspecified (f32 assumed)'}, tolerance {tol:g}, "
          f"batch {tuple(batch['ids'].shape)}")

    # Parameter table: every expected name with its shape, nothing extra.
    shapes = ref.param_shapes(cfg)
    for name, shape in shapes.items():
        if name not in params:
            optional_bias = name.endswith("ffn.gate.bias") and name.replace("gate.bias", "gate.tid2eid") in shapes
            if not optional_bias:
                checks.fail(f"parameter {name} {shape} missing from the dump")
        elif tuple(params[name].shape) != tuple(shape):
            checks.fail(f"parameter {name}: shape {tuple(params[name].shape)} in the dump, expected {shape}")
    for name in sorted(set(params) - set(shapes)):
        checks.fail(f"parameter {name} in the dump is not in docs/model.md's table for this config")
    if checks.failures:
        return checks.exit_code()

    tensors = {}
    for name, value in params.items():
        if ref.is_buffer(name):
            tensors[name] = torch.from_numpy(np.asarray(value))
            if name.endswith("gate.bias"):
                tensors[name] = tensors[name].to(torch.float64)
        else:
            tensors[name] = torch.tensor(np.asarray(value, np.float64), requires_grad=True)
    ids, targets, doc = (torch.from_numpy(batch[k].astype(np.int64)) for k in ("ids", "targets", "doc"))

    res = ref.forward(tensors, cfg, ids, targets, doc, mtp_pad_id=args.mtp_pad_id)
    res["objective"].backward()

    diag = res["diag"]
    if diag.get("router_margin"):
        print(f"smallest router top-k margin (s + bias): {min(diag['router_margin']):.3e}")
    if diag.get("indexer_margin"):
        gaps, ties = zip(*diag["indexer_margin"])
        print(f"smallest indexer top-k margin: {min(gaps):.3e}; queries whose top-k cut falls between equal scores "
              f"(ties to the lower entry, e.g. all-zero relu scores): {sum(ties)}")
    print(f"reference: J = {res['objective'].item():.12g}, loss = {res['loss'].item():.12g}, "
          f"balance = {[round(b.item(), 12) for b in res['balance']]}, indexer KL sum = {res['kl'].item():.6g}")

    j_ref = res["objective"].item()
    checks.check("objective", abs(float(np.ravel(out["objective"])[0]) - j_ref) / abs(j_ref))
    loss_ref = res["loss"].item()
    checks.check("loss", abs(float(np.ravel(out["loss"])[0]) - loss_ref) / abs(loss_ref))
    checks.check("logits", rel_err(out["logits"], res["logits"].detach().numpy()))
    if res["mtp_logits"] is not None:
        if "mtp_logits" not in out:
            checks.fail("out/mtp_logits missing from the dump (mtp_depth = 1)")
        else:
            checks.check("mtp_logits", rel_err(out["mtp_logits"], res["mtp_logits"].detach().numpy()))
    elif "mtp_logits" in out:
        checks.fail("out/mtp_logits in the dump but mtp_depth = 0")

    trainable = sorted(n for n in tensors if not ref.is_buffer(n))
    for name in sorted(set(grads) - set(trainable)):
        checks.fail(f"grads/{name} in the dump is not a trainable parameter")
    no_grad = []
    for name in trainable:
        g = tensors[name].grad
        theirs = np.zeros(tensors[name].shape) if g is None else g.numpy()
        if not np.any(theirs):
            no_grad.append(name)
        if name not in grads:
            checks.fail(f"grads/{name} missing from the dump")
            continue
        compare_grad(checks, name, np.asarray(grads[name], np.float64), theirs)
    print(f"parameters without gradient in the reference ({len(no_grad)}): {', '.join(no_grad) or 'none'}")
    return checks.exit_code()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
