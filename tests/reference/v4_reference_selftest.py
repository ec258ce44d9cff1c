#!/usr/bin/env python3
"""Self-checks of the PyTorch V4 reference (v4_reference.py), independent of Tessera:

- float64 gradcheck of Sinkhorn, both compressors, an mHC site, RoPE, the clamped SwiGLU, the indexer KL;
- the vectorised compressor against a loop over the spec's block formula;
- one attention sublayer (window, HCA, CSA) against a per-query, per-key loop that builds each key set from the
  rules of docs/model.md (window clipped at the document start, completed blocks of the same document, top-k);
- the balance loss against a loop over the V3 formula;
- causality (a later token changes no earlier logit), document isolation (a token changes nothing in other
  documents), and position invariance (a document gives the same logits wherever it sits in the row);
- the gate bias only selects; the indexer loss reaches only indexer.* parameters;
- directional finite differences of J against autograd;
- check_v4.py on dumps written from the reference itself: passes on f64 and f32 copies, fails on a perturbed one.

usage: v4_reference_selftest.py   (exit 0 when all hold)"""
import copy
import io
import json
import math
import os
import sys
import tempfile
from contextlib import redirect_stdout

import h5py
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import check_v4  # noqa: E402
import v4_reference as ref  # noqa: E402
from oracle import Checks  # noqa: E402

torch.set_default_dtype(torch.float64)

CFG = dict(
    arch="deepseek_v4", vocab_size=61, dim=32, n_layers=4, n_heads=4, head_dim=16, rope_dim=8, q_lora_rank=24,
    o_groups=2, o_lora_rank=12, window=6, compress_ratios=[0, 4, 8, 4, 0], csa_ratio=4, rope_theta=10000.0,
    compress_rope_theta=160000.0, yarn_factor=4.0, yarn_original_len=16, yarn_beta_fast=32.0, yarn_beta_slow=1.0,
    index_n_heads=2, index_head_dim=8, index_topk=3, indexer_fp4=False, kv_fp8=False, indexer_loss_weight=0.0,
    n_routed_experts=6, n_shared_experts=1, n_activated_experts=2, moe_inter_dim=16, n_hash_layers=1,
    route_scale=1.5, score_func="sqrtsoftplus", swiglu_limit=0.5, balance_loss_weight=0.01, bias_update_speed=1e-3,
    hc_mult=4, hc_sinkhorn_iters=20, hc_eps=1e-6, mtp_depth=1, mtp_loss_weight=0.3, norm_eps=1e-6,
    max_seq_len=64)
B, T = 2, 26
DOC = torch.tensor([[0] * 10 + [1] * 3 + [2] * 13, [5] * T])


def batch(seed=1, cfg=CFG):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg["vocab_size"], (B, T), generator=g)
    targets = torch.cat([ids[:, 1:], torch.full((B, 1), -1)], 1)
    targets[0, 9] = -1  # document ends have no target
    targets[0, 12] = -1
    targets[1, 4] = -1  # a masked target inside a document
    return ids, targets, DOC.clone()


def leaf(params):
    out = {}
    for k, v in params.items():
        out[k] = v if ref.is_buffer(k) else v.detach().clone().requires_grad_(True)
    return out


# ---------------------------------------------------------------------------------------------- sub-functions

def test_gradchecks(checks):
    g = torch.Generator().manual_seed(3)
    r = torch.randn(3, 4, 4, generator=g, requires_grad=True)
    checks.check("gradcheck sinkhorn", 0.0 if torch.autograd.gradcheck(
        lambda x: ref.sinkhorn(x, 20, 1e-6), (r,)) else 1.0, 0.0)
    for overlap, sc in ((True, 2 * 5), (False, 5)):
        h = torch.randn(11, 7, generator=g, requires_grad=True)
        wkv = torch.randn(sc, 7, generator=g, requires_grad=True)
        wg = torch.randn(sc, 7, generator=g, requires_grad=True)
        ape = torch.randn(3, sc, generator=g, requires_grad=True)
        ok = torch.autograd.gradcheck(lambda *a: ref.compress(*a, 3, overlap), (h, wkv, wg, ape))
        checks.check(f"gradcheck compressor ({'CSA' if overlap else 'HCA'})", 0.0 if ok else 1.0, 0.0)
    p = {"s.fn": torch.randn(24, 4 * 5, generator=g, requires_grad=True),
         "s.base": torch.randn(24, generator=g, requires_grad=True),
         "s.scale": torch.randn(3, generator=g, requires_grad=True)}
    x = torch.randn(2, 3, 4, 5, generator=g, requires_grad=True)
    w = torch.randn(5, generator=g, requires_grad=True)
    m = torch.randn(5, 5, generator=g)

    def site(x, fn, base, scale, w):
        return ref.hc_site(x, "s.", {"s.fn": fn, "s.base": base, "s.scale": scale}, CFG, w, lambda y: torch.tanh(y @ m))

    ok = torch.autograd.gradcheck(site, (x, p["s.fn"], p["s.base"], p["s.scale"], w))
    checks.check("gradcheck mHC site", 0.0 if ok else 1.0, 0.0)
    inv = ref.rope_inv_freq(CFG, True)
    xq = torch.randn(9, 3, 16, generator=g, requires_grad=True)
    pos = torch.arange(9) * 5
    ok = torch.autograd.gradcheck(lambda y: ref.rope(y, pos, inv), (xq,))
    checks.check("gradcheck rope", 0.0 if ok else 1.0, 0.0)
    back = ref.rope(ref.rope(xq, pos, inv), pos, inv, inverse=True)
    checks.check("rope then inverse rope is the identity", float((back - xq).abs().max().detach()), 1e-14)
    # Relative: <rope(q, t), rope(k, s)> depends on t - s only (up to the float32 angle rounding).
    qv, kv = torch.randn(16, generator=g), torch.randn(16, generator=g)
    d1 = (ref.rope(qv[None], torch.tensor([7]), inv) * ref.rope(kv[None], torch.tensor([3]), inv)).sum()
    d2 = (ref.rope(qv[None], torch.tensor([27]), inv) * ref.rope(kv[None], torch.tensor([23]), inv)).sum()
    checks.check("rope is relative", float(abs(d1 - d2)), 1e-5)
    xs = torch.randn(8, 6, generator=g, requires_grad=True)
    w1, w3 = torch.randn(5, 6, generator=g, requires_grad=True), torch.randn(5, 6, generator=g, requires_grad=True)
    w2 = torch.randn(6, 5, generator=g, requires_grad=True)
    ok = torch.autograd.gradcheck(lambda *a: ref.swiglu(*a, 1.3), (xs, w1, w2, w3))
    checks.check("gradcheck clamped SwiGLU", 0.0 if ok else 1.0, 0.0)
    pc = torch.rand(5, 2, 4, generator=g)
    sc_ = torch.randn(5, 4, generator=g, requires_grad=True)
    sel = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 1], [0, 0, 0, 0], [0, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    ok = torch.autograd.gradcheck(lambda s: ref.indexer_kl(pc, s, sel), (sc_,))
    checks.check("gradcheck indexer KL", 0.0 if ok else 1.0, 0.0)
    # Sinkhorn output is (near) doubly stochastic.
    c = ref.sinkhorn(torch.randn(4, 4, generator=g) * 3, 20, 1e-6)
    checks.check("sinkhorn is doubly stochastic", float(max((c.sum(0) - 1).abs().max(), (c.sum(1) - 1).abs().max())),
                 1e-4)
    # YaRN: highest frequencies untouched, lowest divided by the factor.
    plain = 1.0 / 160000.0 ** (np.arange(0, 8, 2) / 8)
    yarn = ref.rope_inv_freq(CFG, True).double().numpy()
    checks.check("YaRN keeps the fastest frequency", abs(yarn[0] / plain[0] - 1), 1e-7)
    checks.check("YaRN divides the slowest frequency by the factor", abs(yarn[-1] * 4.0 / plain[-1] - 1), 1e-7)


def test_compressor_loops(checks):
    g = torch.Generator().manual_seed(4)
    m, c, d, L = 3, 5, 7, 11
    h = torch.randn(L, d, generator=g)
    for overlap in (True, False):
        sc = 2 * c if overlap else c
        wkv, wg, ape = (torch.randn(sc, d, generator=g), torch.randn(sc, d, generator=g),
                        torch.randn(m, sc, generator=g))
        got = ref.compress(h, wkv, wg, ape, m, overlap)
        want = torch.zeros(L // m, c)
        for i in range(L // m):
            for ch in range(c):
                terms = []  # (score, value)
                for j in range(m):
                    tok = m * i + j
                    a = (c if overlap else 0) + ch
                    terms.append((h[tok] @ wg[a] + ape[j, a], h[tok] @ wkv[a]))
                if overlap and i > 0:
                    for j in range(m):
                        tok = m * (i - 1) + j
                        terms.append((h[tok] @ wg[ch] + ape[j, ch], h[tok] @ wkv[ch]))
                zmax = max(float(s) for s, _ in terms)
                den = sum(math.exp(float(s) - zmax) for s, _ in terms)
                want[i, ch] = sum(math.exp(float(s) - zmax) * float(v) for s, v in terms) / den
        checks.check(f"compressor vs spec loop ({'CSA' if overlap else 'HCA'})",
                     float((got - want).abs().max() / want.abs().max()), 1e-13)


def brute_attention_row(h, doc_row, prefix, p, cfg, ratio):
    """One row's attention output (T, H, c) before the output projection, one query and key at a time."""
    t_len = h.shape[0]
    nh, c, eps = cfg["n_heads"], cfg["head_dim"], cfg["norm_eps"]
    m, csa = ratio, ref.is_csa(cfg, ratio)
    inv = ref.rope_inv_freq(cfg, ratio > 0)
    d = doc_row.tolist()
    start_of = [min(s for s in range(t + 1) if all(d[u] == d[t] for u in range(s, t + 1))) for t in range(t_len)]

    def rot(v, t, inverse=False):
        return ref.rope(v[None], torch.tensor([t]), inv, inverse)[0]

    def norm(v, w=None):
        v = v / torch.sqrt((v * v).mean() + eps)
        return v if w is None else v * w

    entries = []  # (doc start, block start, vector, indexer key)
    if ratio > 0:
        for a in sorted(set(start_of)):
            e = a
            while e < t_len and start_of[e] == a:
                e += 1
            for i in range((e - a) // m):
                def one(pre, width, overlap):
                    rows = [(a + m * i + j, width if overlap else 0, j) for j in range(m)]
                    if overlap and i > 0:
                        rows += [(a + m * (i - 1) + j, 0, j) for j in range(m)]
                    z = torch.stack([h[tok] @ p[pre + "wgate"][off:off + width].T + p[pre + "ape"][j, off:off + width]
                                     for tok, off, j in rows])
                    v = torch.stack([h[tok] @ p[pre + "wkv"][off:off + width].T for tok, off, j in rows])
                    return rot(norm((torch.softmax(z, 0) * v).sum(0), p[pre + "norm"]), a + m * i)
                vec = one(prefix + "compressor.", c, csa)
                ikey = None
                if csa:
                    ikey = one(prefix + "indexer.compressor.", cfg["index_head_dim"], True) @ ref.hadamard(
                        cfg["index_head_dim"])
                entries.append((a, a + m * i, vec, ikey))
    out = torch.zeros(t_len, nh, c)
    for t in range(t_len):
        cq = norm(h[t] @ p[prefix + "wq_a"].T, p[prefix + "q_norm"])
        q = (cq @ p[prefix + "wq_b"].T).reshape(nh, c)
        keys = [rot(norm(h[s] @ p[prefix + "wkv"].T, p[prefix + "kv_norm"]), s)
                for s in range(max(t - cfg["window"] + 1, start_of[t]), t + 1)]
        vis = [e for e in entries if e[0] == start_of[t] and e[1] + m - 1 <= t]
        if csa and vis:
            hi, ci = cfg["index_n_heads"], cfg["index_head_dim"]
            qi = (cq @ p[prefix + "indexer.wq_b"].T).reshape(hi, ci)
            qi = torch.stack([rot(qi[k], t) for k in range(hi)]) @ ref.hadamard(ci)
            w = (h[t] @ p[prefix + "indexer.weights_proj"].T) / math.sqrt(ci * hi)
            scored = [(-float(sum(w[k] * torch.relu(qi[k] @ e[3]) for k in range(hi))), n, e)
                      for n, e in enumerate(vis)]
            vis = [e for _, _, e in sorted(scored, key=lambda x: (x[0], x[1]))[:cfg["index_topk"]]]
        keys += [e[2] for e in vis]
        for head in range(nh):
            qh = rot(norm(q[head]), t)
            z = [float(qh @ k) / math.sqrt(c) for k in keys] + [float(p[prefix + "sink"][head])]
            zmax = max(z)
            den = sum(math.exp(x - zmax) for x in z)
            o = sum(math.exp(z[n] - zmax) / den * keys[n] for n in range(len(keys)))
            out[t, head] = rot(o, t, inverse=True)
    return out


def test_attention_loops(checks):
    params = ref.init_params(CFG, seed=5)
    g = torch.Generator().manual_seed(6)
    h = torch.randn(B, T, CFG["dim"], generator=g)
    _, _, doc = batch()
    for layer, kind in ((0, "window"), (1, "CSA"), (2, "HCA")):
        ratio = ref.layer_ratio(CFG, layer)
        pre = f"layers.{layer}.attn."
        got, _ = ref.attention(h, doc, pre, params, CFG, ratio, {})
        outs = torch.stack([brute_attention_row(h[b], doc[b], pre, params, CFG, ratio) for b in range(B)])
        o = outs.reshape(B, T, CFG["o_groups"], -1)
        want = torch.stack([o[:, :, gi] @ params[pre + "wo_a"][gi].T for gi in range(CFG["o_groups"])], 2)
        want = want.reshape(B, T, -1) @ params[pre + "wo_b"].T
        checks.check(f"attention vs per-query loop ({kind})", float((got - want).abs().max() / want.abs().max()),
                     1e-12)


def test_balance_loop(checks):
    params = ref.init_params(CFG, seed=7)
    g = torch.Generator().manual_seed(8)
    h = torch.randn(B, T, CFG["dim"], generator=g)
    ids, _, _ = batch()
    pre = "layers.1.ffn."
    _, bal = ref.moe(h, ids, pre, params, CFG, False, {})
    e_n, k = CFG["n_routed_experts"], CFG["n_activated_experts"]
    total = 0.0
    for b in range(B):
        f, pp = [0.0] * e_n, [0.0] * e_n
        for t in range(T):
            logits = params[pre + "gate.weight"] @ h[b, t]
            s = [math.sqrt(math.log1p(math.exp(float(x)))) for x in logits]
            biased = [s[i] + float(params[pre + "gate.bias"][i]) for i in range(e_n)]
            for i in sorted(range(e_n), key=lambda i: (-biased[i], i))[:k]:
                f[i] += e_n / (k * T)
            for i in range(e_n):
                pp[i] += s[i] / sum(s) / T
        total += sum(f[i] * pp[i] for i in range(e_n))
    want = CFG["balance_loss_weight"] * total / B
    checks.check("balance loss vs V3 loop", abs(bal.item() - want) / want, 1e-13)


def test_moe_loop(checks):
    """The MoE output, token by token, for each score function and for a hash layer."""
    g = torch.Generator().manual_seed(9)
    h = torch.randn(B, T, CFG["dim"], generator=g)
    ids, _, _ = batch()
    e_n, k, lim = CFG["n_routed_experts"], CFG["n_activated_experts"], CFG["swiglu_limit"]
    for func, layer in (("sqrtsoftplus", 1), ("sigmoid", 2), ("softmax", 3), ("sqrtsoftplus", 0)):
        cfg = dict(CFG, score_func=func)
        params = ref.init_params(cfg, seed=10)
        pre = f"layers.{layer}.ffn."
        hash_layer = layer < cfg["n_hash_layers"]
        got, _ = ref.moe(h, ids, pre, params, cfg, hash_layer, {})

        def expert(x, w1, w2, w3):
            a = torch.tensor([min(float(v), lim) for v in w1 @ x])
            u = torch.tensor([max(min(float(v), lim), -lim) for v in w3 @ x])
            return w2 @ (a / (1 + torch.exp(-a)) * u)

        want = torch.zeros_like(got)
        for b in range(B):
            for t in range(T):
                x = h[b, t]
                z = [float(v) for v in params[pre + "gate.weight"] @ x]
                if func == "sqrtsoftplus":
                    sc = [math.sqrt(math.log1p(math.exp(v))) for v in z]
                elif func == "sigmoid":
                    sc = [1 / (1 + math.exp(-v)) for v in z]
                else:
                    sc = [math.exp(v) / sum(math.exp(u) for u in z) for v in z]
                if hash_layer:
                    sel = [int(i) for i in params[pre + "gate.tid2eid"][ids[b, t]]]
                else:
                    bias = [float(v) for v in params[pre + "gate.bias"]]
                    sel = sorted(range(e_n), key=lambda i: (-(sc[i] + bias[i]), i))[:k]
                norm = 1.0 if func == "softmax" else sum(sc[i] for i in sel)
                y = expert(x, params[pre + "shared.w1"], params[pre + "shared.w2"], params[pre + "shared.w3"])
                for i in sel:
                    y = y + cfg["route_scale"] * sc[i] / norm * expert(
                        x, params[pre + "experts.w1"][i], params[pre + "experts.w2"][i], params[pre + "experts.w3"][i])
                want[b, t] = y
        kind = "hash layer" if hash_layer else func
        checks.check(f"MoE vs per-token loop ({kind})", float((got - want).abs().max() / want.abs().max()), 1e-13)


# ---------------------------------------------------------------------------------------------- whole model

def run(params, ids, targets, doc, cfg=CFG):
    with torch.no_grad():
        return ref.forward(params, cfg, ids, targets, doc)


def test_masking(checks):
    params = ref.init_params(CFG, seed=11)
    ids, targets, doc = batch()
    base = run(params, ids, targets, doc)
    # Causality: changing token t0 leaves main logits before t0 and MTP logits before t0 - 1 unchanged.
    for t0 in (5, 17, T - 1):
        ids2 = ids.clone()
        ids2[:, t0] = (ids2[:, t0] + 7) % CFG["vocab_size"]
        res = run(params, ids2, targets, doc)
        d_main = float((res["logits"][:, :t0] - base["logits"][:, :t0]).abs().max())
        d_mtp = float((res["mtp_logits"][:, :t0 - 1] - base["mtp_logits"][:, :t0 - 1]).abs().max())
        # (not bit-exact: an expert's matmul sees a different number of rows when routing of later tokens changes)
        checks.check(f"causality: token {t0} changes no earlier logit", max(d_main, d_mtp), 1e-13)
        later = float((res["logits"][:, t0:] - base["logits"][:, t0:]).abs().max())
        checks.check(f"token {t0} does change its own logits (sanity)", 0.0 if later > 0 else 1.0, 0.0)
    # Document isolation: a change inside document 1 (positions 10..12) leaves documents 0 and 2 alone; the MTP
    # input at 9 (last of doc 0) reads token 10, so change token 11.
    ids2 = ids.clone()
    ids2[0, 11] = (ids2[0, 11] + 3) % CFG["vocab_size"]
    res = run(params, ids2, targets, doc)
    other = torch.ones(T, dtype=torch.bool)
    other[10:13] = False
    d = max(float((res["logits"][0, other] - base["logits"][0, other]).abs().max()),
            float((res["mtp_logits"][0, other] - base["mtp_logits"][0, other]).abs().max()))
    checks.check("document isolation (logits of other documents unchanged)", d, 1e-13)
    # Position invariance: document 2 of row 0 (positions 13..25) placed at the start of a row gives the same logits.
    ids3, doc3 = ids.clone(), doc.clone()
    ids3[1, :13] = ids[0, 13:]
    doc3[1, :13] = 0
    doc3[1, 13:] = 1
    res = run(params, ids3, targets, doc3)
    a, b_ = res["logits"][1, :12], base["logits"][0, 13:25]
    checks.check("position invariance (document moved within a row)", float((a - b_).abs().max() / b_.abs().max()),
                 1e-5)
    a, b_ = res["mtp_logits"][1, :12], base["mtp_logits"][0, 13:25]
    checks.check("position invariance of MTP logits", float((a - b_).abs().max() / b_.abs().max()), 1e-5)


def test_bias_and_indexer_loss(checks):
    params = ref.init_params(CFG, seed=12)
    ids, targets, doc = batch()
    base = run(params, ids, targets, doc)
    p2 = dict(params)
    for name in p2:
        if name.endswith("gate.bias"):
            p2[name] = p2[name] + 5.0  # same ordering of s + bias, so the same selection
    res = run(p2, ids, targets, doc)
    checks.check("a uniform gate bias shift changes nothing (bias selects only)",
                 abs(res["objective"].item() - base["objective"].item()), 0.0)
    hash_bias = "layers.0.ffn.gate.bias"
    p3 = dict(params)
    p3[hash_bias] = torch.randn(CFG["n_routed_experts"]) * 10
    res = run(p3, ids, targets, doc)
    checks.check("the hash layer ignores gate.bias", abs(res["objective"].item() - base["objective"].item()), 0.0)

    def grads(cfg):
        lp = leaf(params)
        out = ref.forward(lp, cfg, ids, targets, doc)
        out["objective"].backward()
        return {k: (v.grad if v.grad is not None else torch.zeros_like(v)) for k, v in lp.items()
                if not ref.is_buffer(k)}, out

    g0, _ = grads(CFG)
    cfg1 = dict(CFG, indexer_loss_weight=0.5)
    g1, out1 = grads(cfg1)
    checks.check("indexer KL is positive", 0.0 if out1["kl"].item() > 0 else 1.0, 0.0)
    idx_names = [k for k in g0 if ".indexer." in k]
    checks.check("indexer parameters get no gradient without the indexer loss",
                 max(float(g0[k].abs().max()) for k in idx_names), 0.0)
    checks.check("indexer parameters all get gradient from the indexer loss",
                 0.0 if all(float(g1[k].abs().max()) > 0 for k in idx_names) else 1.0, 0.0)
    other = max(float((g1[k] - g0[k]).abs().max()) for k in g0 if ".indexer." not in k)
    checks.check("the indexer loss reaches only indexer parameters", other, 0.0)


def test_finite_differences(checks):
    """J's gradient is autograd's through the model, except that the indexer loss sees h and cq detached: the
    finite differences of the non-indexer parameters therefore run with the indexer loss off, and those of the
    indexer parameters with it on (they reach J through it only)."""
    params = ref.init_params(CFG, seed=13)
    ids, targets, doc = batch()
    g = torch.Generator().manual_seed(14)
    eps = 1e-6
    for cfg, names in (
            (CFG, ["tok_embeddings", "layers.0.hc_attn.fn", "layers.0.ffn.gate.weight", "layers.1.attn.compressor.ape",
                   "layers.2.attn.compressor.wgate", "layers.3.attn.wo_a", "layers.3.hc_ffn.scale",
                   "layers.2.ffn.experts.w1", "layers.1.ffn.shared.w3", "mtp.e_proj", "mtp.block.attn.sink",
                   "mtp.hc_head.base", "output", "hc_head.scale"]),
            (dict(CFG, indexer_loss_weight=0.5), ["layers.1.attn.indexer.wq_b", "layers.1.attn.indexer.weights_proj",
                                                   "layers.3.attn.indexer.compressor.wkv",
                                                   "layers.3.attn.indexer.compressor.ape"])):
        lp = leaf(params)
        ref.forward(lp, cfg, ids, targets, doc)["objective"].backward()
        for name in names:
            v = torch.randn(params[name].shape, generator=g)
            plus, minus = dict(params), dict(params)
            plus[name] = params[name] + eps * v
            minus[name] = params[name] - eps * v
            fd = (run(plus, ids, targets, doc, cfg)["objective"]
                  - run(minus, ids, targets, doc, cfg)["objective"]) / (2 * eps)
            ad = (lp[name].grad * v).sum()
            # central differences: O(eps^2) truncation plus ~1e-16 |J| / eps rounding
            checks.check(f"finite differences dJ/d {name} (|ad| = {float(abs(ad)):.1e})",
                         float(abs(fd - ad) / (abs(ad) + 1e-3)), 1e-6)


def write_dump(path, cfg, params, ids, targets, doc, res, grads, dtype):
    npd = np.float64 if dtype == "f64" else np.float32
    with h5py.File(path, "w") as f:
        f.attrs["config_json"] = json.dumps(cfg)
        f.attrs["dtype"] = dtype
        for k, v in params.items():
            arr = v.detach().numpy()
            f[f"params/{k}"] = arr.astype(np.int32) if k.endswith("tid2eid") else arr.astype(npd)
        for k, v in (("ids", ids), ("targets", targets), ("doc", doc)):
            f[f"batch/{k}"] = v.numpy().astype(np.int32)
        f["out/objective"] = np.array([res["objective"].item()], npd)
        f["out/loss"] = np.array([res["loss"].item()], npd)
        f["out/logits"] = res["logits"].detach().numpy().astype(npd)
        if res["mtp_logits"] is not None:
            f["out/mtp_logits"] = res["mtp_logits"].detach().numpy().astype(npd)
        for k, v in grads.items():
            f[f"grads/{k}"] = v.astype(npd)


def test_check_script(checks):
    cfg = CFG
    params = ref.init_params(cfg, seed=15)
    ids, targets, doc = batch()
    lp = leaf(params)
    res = ref.forward(lp, cfg, ids, targets, doc)
    res["objective"].backward()
    grads = {k: (v.grad.numpy() if v.grad is not None else np.zeros(v.shape)) for k, v in lp.items()
             if not ref.is_buffer(k)}
    with tempfile.TemporaryDirectory() as tmp:
        def check(name, dtype, g, want_rc, p=params, extra=()):
            path = os.path.join(tmp, name + ".h5")
            write_dump(path, cfg, p, ids, targets, doc, res, g, dtype)
            buf = io.StringIO()
            with redirect_stdout(buf):
                rc = check_v4.main([path, *extra])
            checks.check(f"check_v4.py on {name} exits {want_rc}", 0.0 if rc == want_rc else 1.0, 0.0)
            if rc != want_rc:
                print(buf.getvalue())

        check("f64 reference dump", "f64", grads, 0)
        check("f32 reference dump", "f32", grads, 0)
        bad = copy.deepcopy(grads)
        bad["layers.2.attn.compressor.ape"] = bad["layers.2.attn.compressor.ape"] * (1 + 1e-6)
        check("perturbed f64 dump", "f64", bad, 1)
        bad = copy.deepcopy(grads)
        bad["layers.1.attn.indexer.wq_b"] = bad["layers.1.attn.indexer.wq_b"] + 1e-9
        check("dump with a nonzero indexer gradient", "f32", bad, 1)
        bad = copy.deepcopy(grads)
        del bad["mtp.norm"]
        check("dump missing a gradient", "f64", bad, 1)
        p2 = dict(params)
        p2["layers.0.extra"] = torch.zeros(3)
        check("dump with an unknown parameter", "f64", grads, 1, p=p2)


def main():
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny tensors: threads only add overhead
    checks = Checks(0.0)
    for test in (test_gradchecks, test_compressor_loops, test_attention_loops, test_balance_loop, test_moe_loop,
                 test_masking,
                 test_bias_and_indexer_loss, test_finite_differences, test_check_script):
        print(f"-- {test.__name__}")
        test(checks)
    return checks.exit_code()


if __name__ == "__main__":
    sys.exit(main())
