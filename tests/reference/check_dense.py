#!/usr/bin/env python3
"""The independent oracle for the dense model: Hugging Face's LlamaForCausalLM, loaded from Tessera's export,
must give Tessera's logits, loss and every parameter gradient on the same batch, and torch.optim.AdamW must
give Tessera's ten-step loss trajectory and final weights (max relative error 1e-4 in fp32).

usage: check_dense.py DUMP_DIR   (DUMP_DIR written by the dense_dump program)"""
import sys

import h5py
import numpy as np
import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from oracle import Checks, rel_err  # noqa: E402  (tests/reference/oracle.py)

TOL = 1e-4


def load_model(path):
    model = LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float32, attn_implementation="eager")
    return model.train()  # no dropout in Llama; train() only for clarity


def loss_of(model, inputs, targets):
    logits = model(input_ids=inputs).logits
    return logits, F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def main(out):
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    checks = Checks(TOL)
    check = checks.check

    with h5py.File(f"{out}/dump.h5", "r") as f:
        model = load_model(f"{out}/hf")
        inputs = torch.from_numpy(f["inputs"][()]).long()
        targets = torch.from_numpy(f["targets"][()]).long()
        logits, loss = loss_of(model, inputs, targets)
        check("logits", rel_err(f["logits"][()], logits.detach().numpy()))
        check("loss", abs(f.attrs["loss"] - loss.item()) / abs(loss.item()))
        loss.backward()
        names = dict(model.named_parameters())
        grads = f["grads"]
        missing = set(names) - set(grads)
        if missing:
            checks.fail(f"gradients missing from Tessera's dump: {sorted(missing)}")
        for name in sorted(grads):
            check(f"grad {name}", rel_err(grads[name][()], names[name].grad.numpy()))

        # Ten AdamW steps from the same initial weights, same batches, clipping and learning rates.
        model = load_model(f"{out}/hf")
        decay = [p for n, p in model.named_parameters() if f.attrs[f"decay/{n}"]]
        no_decay = [p for n, p in model.named_parameters() if not f.attrs[f"decay/{n}"]]
        lrs = f["adamw/lrs"][()]
        opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": f.attrs["adamw.weight_decay"]},
             {"params": no_decay, "weight_decay": 0.0}],
            lr=float(lrs[0]), betas=(f.attrs["adamw.beta1"], f.attrs["adamw.beta2"]), eps=f.attrs["adamw.eps"],
            foreach=False)
        ours = f["adamw/losses"][()]
        theirs = []
        for step in range(len(lrs)):
            for group in opt.param_groups:
                group["lr"] = float(lrs[step])
            opt.zero_grad()
            _, loss = loss_of(model, torch.from_numpy(f["adamw/inputs"][step]).long(),
                              torch.from_numpy(f["adamw/targets"][step]).long())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), f.attrs["adamw.grad_clip"])
            opt.step()
            theirs.append(loss.item())
        print("AdamW losses, Tessera:", " ".join(f"{x:.6f}" for x in ours))
        print("AdamW losses, PyTorch:", " ".join(f"{x:.6f}" for x in theirs))
        check("AdamW loss trajectory", float(np.max(np.abs(ours - np.array(theirs)) / np.abs(theirs))))
        if np.all(ours == ours[0]):
            checks.fail("AdamW trajectory did not move")
        # Final weights by relative Frobenius error: Adam divides each element's update by its own gradient
        # scale, so an element whose whole gradient history is fp32 rounding noise moves by noise, in either
        # implementation (seen: one embedding element of 16896 off by 1e-4 while the rest agree to 1e-6).
        final = dict(model.named_parameters())
        for name in sorted(f["adamw/final"]):
            ours_w, theirs_w = f["adamw/final"][name][()], final[name].detach().numpy()
            check(f"AdamW final {name} (Frobenius)",
                  float(np.linalg.norm(ours_w - theirs_w) / np.linalg.norm(theirs_w)))

    return checks.exit_code()

if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
