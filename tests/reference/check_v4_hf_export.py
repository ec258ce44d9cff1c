#!/usr/bin/env python3
"""Checks Tessera's Hugging Face DeepseekV4 export without a Tessera V4 forward: a random tiny V4 (every layer
kind, hash and score-routed MoE, YaRN, active SwiGLU clamps) is exported by the C++ exporter; transformers must
load it with no missing or unexpected keys, and its logits must equal those of `reference_forward` below, a
direct PyTorch transcription of docs/model.md ("Dataflow", "Positions, documents and visibility") run on the
*Tessera-named* weights. So the name/layout mapping and HF's semantics are both checked against docs/model.md.

usage: check_v4_hf_export.py DIR
  DIR written by `test_io --gtest_also_run_disabled_tests --gtest_filter=HfExportV4.DISABLED_DumpForHf`
  with TESSERA_V4_HF_DUMP=DIR: DIR/hf (the export), DIR/tessera.safetensors, DIR/tessera_config.json.

The reference implements docs/model.md in float64 with the indexer's Walsh-Hadamard rotation (FP4 off) and
ties broken to the lower index. Checked: the agreed configuration (index_topk >= the CSA blocks of a row), with
and without HF's cache; and index_topk = 2 and 1 (sparse), where HF's selection must be a valid top-k of the
reference's scores and the logits must match given it (exact score ties, common at 0 when every ReLU is 0, are
broken differently: torch.topk unspecified, Tessera to the lower index)."""
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from check_v4_hf import load_hf_v4  # noqa: E402
from oracle import Checks, rel_err  # noqa: E402

TOL = 1e-4


# ---------------------------------------------------------------------------------------------- docs/model.md
def rms(x, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def inv_freq(cfg, compressed):
    """Window-only layers: rope_theta, no YaRN. Compressed layers: compress_rope_theta, YaRN if factor > 1
    (no attention factor on cos/sin)."""
    r = cfg["rope_dim"]
    base = cfg["compress_rope_theta"] if compressed else cfg["rope_theta"]
    freqs = 1.0 / (base ** (torch.arange(0, r, 2, dtype=torch.float64) / r))
    if compressed and cfg["yarn_factor"] > 1:
        orig = cfg["yarn_original_len"]

        def corr(rot):
            return r * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(corr(cfg["yarn_beta_fast"])), 0)
        high = min(math.ceil(corr(cfg["yarn_beta_slow"])), r - 1)
        if low == high:
            high += 0.001
        ramp = ((torch.arange(r // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
        smooth = 1 - ramp
        freqs = freqs / cfg["yarn_factor"] * (1 - smooth) + freqs * smooth
    return freqs


def rope(x, pos, freqs):
    """Interleaved pairs (2i, 2i+1) of the last r dims of x (P, [heads,] c) rotated by pos[p] * freq_i."""
    r = 2 * freqs.shape[0]
    ang = pos.to(torch.float64)[:, None] * freqs[None, :]  # (P, r/2)
    shape = (pos.shape[0],) + (1,) * (x.dim() - 2) + (r // 2,)
    cos, sin = ang.cos().view(shape), ang.sin().view(shape)
    head, tail = x[..., :-r], x[..., -r:]
    a, b = tail[..., 0::2], tail[..., 1::2]
    rot = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1).flatten(-2)
    return torch.cat((head, rot), dim=-1)


def hadamard(x):
    """Normalised Walsh-Hadamard rotation of the last dim (a power of two)."""
    n = x.shape[-1]
    h = torch.ones(1, 1, dtype=x.dtype)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    return x @ h.T / math.sqrt(n)


def compress(h, W, pre, m, overlap, width, cfg, freqs):
    """Blocks of m tokens from position 0, trailing tokens dropped. overlap (CSA): rows [0, width) of wkv/wgate
    and columns [0, width) of ape are series b (used by the next block), [width, 2 width) series a (own)."""
    T = h.shape[0]
    nb = T // m
    if nb == 0:
        return h.new_zeros(0, width)
    kv = h[: nb * m] @ W[pre + "wkv"].T
    z = h[: nb * m] @ W[pre + "wgate"].T
    ape = W[pre + "ape"]
    kv = kv.view(nb, m, -1)
    z = z.view(nb, m, -1) + ape[None]
    out = []
    for i in range(nb):
        if overlap:
            vals, scores = [kv[i, :, width:]], [z[i, :, width:]]
            if i > 0:
                vals.append(kv[i - 1, :, :width])
                scores.append(z[i - 1, :, :width])
            v, s = torch.cat(vals, 0), torch.cat(scores, 0)
        else:
            v, s = kv[i], z[i]
        out.append((torch.softmax(s, dim=0) * v).sum(0))
    c = rms(torch.stack(out), cfg["norm_eps"]) * W[pre + "norm"]
    return rope(c, torch.arange(nb) * m, freqs)


def swiglu(x, w1, w3, w2, limit):
    g, u = x @ w1.T, x @ w3.T
    if limit > 0:
        g, u = g.clamp(max=limit), u.clamp(-limit, limit)
    return (F.silu(g) * u) @ w2.T


def attention(h, W, L, cfg, layer, index_topk, forced=None, problems=None):
    """forced: (T, k) entry indices (-1 = none) to use instead of the indexer's own top-k; each must be a valid
    top-k of the reference's scores (ties aside), else a line is added to problems."""
    T = h.shape[0]
    H, c, eps = cfg["n_heads"], cfg["head_dim"], cfg["norm_eps"]
    m = cfg["compress_ratios"][layer]
    csa = m == cfg["csa_ratio"]
    freqs = inv_freq(cfg, m > 0)
    pos = torch.arange(T)
    cq = rms(h @ W[L + "attn.wq_a"].T, eps) * W[L + "attn.q_norm"]
    q = rope(rms((cq @ W[L + "attn.wq_b"].T).view(T, H, c), eps), pos, freqs)
    kv = rope(rms(h @ W[L + "attn.wkv"].T, eps) * W[L + "attn.kv_norm"], pos, freqs)
    keys, allowed = [kv], []
    win = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - cfg["window"])
    allowed.append(win)
    if m > 0:
        comp = compress(h, W, L + "attn.compressor.", m, csa, c, cfg, freqs)
        nb = comp.shape[0]
        visible = (torch.arange(nb)[None, :] * m + m - 1) <= pos[:, None]  # completed blocks only
        if csa and nb:
            HI, cI = cfg["index_n_heads"], cfg["index_head_dim"]
            qi = hadamard(rope((cq @ W[L + "attn.indexer.wq_b"].T).view(T, HI, cI), pos, freqs))
            ki = hadamard(compress(h, W, L + "attn.indexer.compressor.", m, True, cI, cfg, freqs))
            w = (h @ W[L + "attn.indexer.weights_proj"].T) * cI ** -0.5 * HI ** -0.5
            score = (w[:, :, None] * torch.relu(torch.einsum("thc,sc->ths", qi, ki))).sum(1)  # (T, nb)
            sel = torch.zeros_like(visible)
            for t in range(T):
                vis = [s for s in range(nb) if visible[t, s]]
                vis.sort(key=lambda s: (-score[t, s].item(), s))  # ties to the lower index
                k = min(index_topk, len(vis))
                if forced is None:
                    chosen = vis[:k]
                else:
                    chosen = sorted(int(s) for s in forced[t] if s >= 0)
                    rest = [s for s in vis if s not in chosen]
                    tol = 1e-9 * (1 + score[t].abs().max().item())
                    if (len(chosen) != k or any(not visible[t, s] for s in chosen) or
                            (rest and min(score[t, s].item() for s in chosen) < max(score[t, s].item() for s in rest) - tol)):
                        problems.append(f"{L} t={t}: HF selected {chosen}, not a top-{k} of {score[t, :].tolist()}")
                for s in chosen:
                    sel[t, s] = True
            visible = sel
        keys.append(comp)
        allowed.append(visible)
    K = torch.cat(keys, 0)
    mask = torch.cat(allowed, 1)
    logits = torch.einsum("thc,sc->ths", q, K) / math.sqrt(c)
    logits = logits.masked_fill(~mask[:, None, :], float("-inf"))
    sink = W[L + "attn.sink"][None, :, None].expand(T, H, 1)
    p = torch.softmax(torch.cat((logits, sink), -1), -1)[..., :-1]
    o = torch.einsum("ths,sc->thc", p, K)
    o = rope(o, -pos, freqs)
    g = cfg["o_groups"]
    og = o.reshape(T, g, H * c // g)
    y = torch.einsum("tgi,gri->tgr", og, W[L + "attn.wo_a"]).reshape(T, -1)
    return y @ W[L + "attn.wo_b"].T


def moe(h, ids, W, L, cfg, layer):
    logits = h @ W[L + "ffn.gate.weight"].T
    s = torch.sqrt(F.softplus(logits)) if cfg["score_func"] == "sqrtsoftplus" else torch.sigmoid(logits)
    if layer < cfg["n_hash_layers"]:
        idx = W[L + "ffn.gate.tid2eid"][ids].long()
    else:
        idx = torch.topk(s + W[L + "ffn.gate.bias"], cfg["n_activated_experts"], dim=-1).indices
    g = s.gather(1, idx)
    g = cfg["route_scale"] * g / g.sum(-1, keepdim=True)
    lim = cfg["swiglu_limit"]
    out = swiglu(h, W[L + "ffn.shared.w1"], W[L + "ffn.shared.w3"], W[L + "ffn.shared.w2"], lim)
    w1, w3, w2 = W[L + "ffn.experts.w1"], W[L + "ffn.experts.w3"], W[L + "ffn.experts.w2"]
    for t in range(h.shape[0]):
        for j in range(idx.shape[1]):
            e = idx[t, j]
            out[t] += g[t, j] * swiglu(h[t:t + 1], w1[e], w3[e], w2[e], lim)[0]
    return out


def mhc(X, W, site, cfg, sublayer, norm_w):
    n, eps = cfg["hc_mult"], cfg["hc_eps"]
    N = X.shape[0]
    mix = rms(X.reshape(N, -1), cfg["norm_eps"]) @ W[site + ".fn"].T
    a, b = W[site + ".scale"], W[site + ".base"]
    pre = torch.sigmoid(a[0] * mix[:, :n] + b[:n]) + eps
    post = 2 * torch.sigmoid(a[1] * mix[:, n:2 * n] + b[n:2 * n])
    R = (a[2] * mix[:, 2 * n:] + b[2 * n:]).view(N, n, n)  # R[j, k]
    C = torch.softmax(R, -1) + eps
    C = C / (C.sum(-2, keepdim=True) + eps)
    for _ in range(cfg["hc_sinkhorn_iters"] - 1):
        C = C / (C.sum(-1, keepdim=True) + eps)
        C = C / (C.sum(-2, keepdim=True) + eps)
    y = (pre[:, :, None] * X).sum(1)
    f = sublayer(rms(y, cfg["norm_eps"]) * norm_w)
    return post[:, :, None] * f[:, None, :] + torch.einsum("njk,njd->nkd", C, X)


def reference_forward(W, cfg, ids, index_topk, forced=None, problems=None):
    """Logits (B, T, V) of docs/model.md for one document per row (positions 0..T-1). forced: {layer: (B, T, k)}
    CSA selections to use instead of the reference's own (see attention)."""
    out = []
    for b, row in enumerate(ids):
        X = W["tok_embeddings"][row][:, None, :].expand(-1, cfg["hc_mult"], -1).clone()
        for layer in range(cfg["n_layers"]):
            L = f"layers.{layer}."
            X = mhc(X, W, L + "hc_attn", cfg, lambda h: attention(h, W, L, cfg, layer, index_topk,
                                                      None if forced is None else forced.get(layer, [None] * len(ids))[b],
                                                      problems),
                    W[L + "attn_norm"])
            X = mhc(X, W, L + "hc_ffn", cfg, lambda h: moe(h, row, W, L, cfg, layer), W[L + "ffn_norm"])
        mix = rms(X.reshape(X.shape[0], -1), cfg["norm_eps"]) @ W["hc_head.fn"].T
        w = torch.sigmoid(W["hc_head.scale"] * mix + W["hc_head.base"]) + cfg["hc_eps"]
        y = (w[:, :, None] * X).sum(1)
        out.append((rms(y, cfg["norm_eps"]) * W["norm"]) @ W["output"].T)
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------- the check
def main(d):
    torch.manual_seed(0)
    checks = Checks(TOL)
    with open(f"{d}/tessera_config.json") as f:
        cfg = json.load(f)
    W = {k: (v.double() if v.is_floating_point() else v) for k, v in load_file(f"{d}/tessera.safetensors").items()}
    model = load_hf_v4(f"{d}/hf", checks)
    if model is None or checks.failures:
        return checks.exit_code()

    B, T = 2, 32
    ids = torch.randint(0, cfg["vocab_size"], (B, T))
    nb = T // cfg["csa_ratio"]
    indexers = {i: layer.self_attn.compressor.indexer for i, layer in enumerate(model.model.layers)
                if layer.self_attn.compressor is not None and hasattr(layer.self_attn.compressor, "indexer")}
    picks = {}
    for i, ix in indexers.items():
        ix.register_forward_hook(lambda mod, inp, out, i=i: picks.__setitem__(i, out.detach().clone()))
    for topk in (cfg["index_topk"], 2, 1):
        for ix in indexers.values():
            ix.index_topk = topk
        with torch.no_grad():
            theirs = model(input_ids=ids, use_cache=False).logits.double()
            ours = reference_forward(W, cfg, ids, topk)
        label = f"index_topk {topk} ({'>=' if topk >= nb else '<'} {nb} CSA blocks per row)"
        if topk >= nb:  # the agreed configuration: identical by construction
            checks.check(f"logits, {label}", rel_err(ours.numpy(), theirs.numpy()))
            continue
        # Sparse: the same up to ties in the top-k. Report the reference's own choice, then require HF's choice
        # to be a valid top-k of the reference's scores and the logits to match given that choice.
        err = rel_err(ours.numpy(), theirs.numpy())
        print(f"note logits, {label}, ties to the lower index: max relative error {err:.2e}"
              + ("" if err <= TOL else " (HF's torch.topk broke a tie differently)"))
        problems = []
        with torch.no_grad():
            ours = reference_forward(W, cfg, ids, topk, forced=dict(picks), problems=problems)
        for p in problems:
            checks.fail(p)
        checks.check(f"logits, {label}, HF's selection", rel_err(ours.numpy(), theirs.numpy()))
    # Same check through HF's cached path (the default use_cache=True builds DeepseekV4 cache layers).
    for ix in indexers.values():
        ix.index_topk = cfg["index_topk"]
    with torch.no_grad():
        cached = model(input_ids=ids).logits.double()
        ours = reference_forward(W, cfg, ids, cfg["index_topk"])
    checks.check("logits with use_cache=True (prefill)", rel_err(ours.numpy(), cached.numpy()))
    return checks.exit_code()


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1]))
