#!/usr/bin/env python3
"""An independent PyTorch formulation of Tessera's DeepSeek-V4 model, used as a test oracle.

Written from ../shared/spec/deepseek-v4.md (sections 2-8) and docs/model.md only, with plain torch ops and
autograd, meant to run in float64. The entry point is

    forward(params, cfg, ids, targets, doc) -> dict(objective=J, loss=main CE mean, logits=(B,T,V),
                                                   mtp_logits=(B,T,V) or None, plus diagnostic terms)

`params` maps checkpoint names (docs/model.md) to tensors; `cfg` is a dict with the ModelConfig fields
(src/model/config.h); ids / targets / doc are (B, T) integer tensors (target -1 = none, doc = document id of each
position). Gradients of J with respect to the parameter tensors come from autograd.

The choices this file makes where the docs leave room are listed in INTERPRETATIONS below (and in the report that
came with it); the C++ side must agree with them.

`param_shapes(cfg)` gives the full parameter table (name -> shape) and `init_params(cfg, seed)` random values for
it (for the self-test; not Tessera's initialisation).
"""
import math

import numpy as np
import torch
import torch.nn.functional as F

INTERPRETATIONS = """
1. RoPE: inv_freq_i = theta^(-2i/r) (YaRN-corrected when it applies) is computed in float64 and rounded once to
   float32; angle = float32(pos) * inv_freq in float32 arithmetic; cos/sin of that float32 angle in float64.
   Inverse RoPE uses the negated float32 angle. Pairs (c-r+2i, c-r+2i+1) rotate as a complex number times e^{i angle}.
2. YaRN (compressed layers, yarn_factor > 1, always, whatever the sequence length): DeepSeek's form with dim = r:
   d(rot) = r*ln(orig/(rot*2*pi)) / (2*ln(theta)); low = max(floor(d(beta_fast)), 0), high = min(ceil(d(beta_slow)),
   r-1); if low == high: high += 0.001; ramp_i = clamp((i-low)/(high-low), 0, 1) for i in [0, r/2);
   inv_freq_i = inv_freq_i/factor * ramp_i + inv_freq_i * (1 - ramp_i).
3. RMSNorm everywhere (weighted, weightless, the per-head q norm, mHC's and hc_head's rmsnorm_noweight of vec X):
   x * rsqrt(mean(x^2) + norm_eps).
4. mHC: vec X is stream-major ([X_0 | X_1 | ...], column j*d+i of fn is stream j channel i); mix columns [0,n) pre,
   [n,2n) post, [2n+n*j+k] comb row j column k; pre = sigmoid(.) + hc_eps, post = 2 sigmoid(.), Sinkhorn eps = hc_eps
   (first softmax along k, then column-normalise, then iters-1 rounds of row, column); X'_k = post_k f +
   sum_j C_jk X_j. hc_head: sigmoid(scale[0] * mix + base) + hc_eps.
5. Documents are the maximal runs of equal doc id inside a row (rows are independent; a doc id that recurs after
   another document is a new document). Positions are indices in the row.
6. Compressor: block i of a document starting at a covers a+m*i .. a+m*i+m-1 (trailing partial block dropped); CSA
   block i softmaxes per channel over its own m tokens (series a = rows/columns [c,2c), ape[j, c:2c] for the j-th
   token) and the previous block's m tokens (series b = [0,c), ape[j, 0:c]); block 0 of each document has no b
   half. Then rmsnorm_w(compressor.norm), RoPE at a+m*i. The indexer's compressor is the same with c_I; then
   Hadamard. Compressed entries of a row are ordered by block start ("lower index" = earlier block).
7. Attention: scores q.k / sqrt(c) over [window keys, selected/visible compressed entries] plus the sink logit in
   the denominator only; the value is the same (RoPE'd) vector as the key; inverse RoPE on the output at -t.
   o (H, c) is flattened head-major to H*c and group g takes the contiguous slice [g*H*c/g, (g+1)*H*c/g).
8. Indexer: Sylvester-ordered Walsh-Hadamard matrix / sqrt(c_I) on the whole c_I dims after RoPE (irrelevant to the
   scores without FP4: both sides are rotated). score_{t,s} = sum_h w_h relu(qi_h . k_s); top min(topk, #visible)
   by a stable descending sort (ties to the lower entry index); selection uses the score value only.
9. Indexer loss (indexer_loss_weight > 0): for every query position with >= 1 selected entry (targets or not),
   KL(p || softmax(score over the selected)), p = attention probability (after the sink softmax, detached) of the
   selected entries summed over heads, divided by its sum; score from detached h and cq (the indexer compressor
   also reads the detached h), so only indexer.* parameters get this gradient. Summed over CSA layers and
   positions, times indexer_loss_weight / N_tgt.
10. MoE: s = sqrt(softplus(logits)) with the exact softplus log1p(exp(-|x|)) + max(x, 0) (no threshold), sigmoid,
   or softmax over experts. Score-routed selection: top-k of s + gate.bias by a stable descending sort (ties to the
   lower expert). Hash layers: tid2eid[token id]; no bias, no balance loss. g = route_scale * s[idx] / sum s[idx]
   (softmax: route_scale * s[idx]). Expert: w2 @ (silu(min(w1 h, L)) * clamp(w3 h, -L, L)) (torch.clamp, L = 0 no
   clamp), times g; shared expert the same with L, added unweighted.
11. Balance loss per score-routed layer (MTP block included): per row b with T = the row's full length (every
   position, targets or not), f_i = E/(k T) * #{t in row: i selected}, P_i = mean_t s_i,t / sum_j s_j,t,
   loss = balance_loss_weight * mean_b sum_i f_i P_i; f carries no gradient. Added to J unnormalised.
12. MTP: next id at t is ids[t+1] (even when t+1 starts another document), and at t = T-1 (no next token) the pad
   id MTP_PAD_ID = 0; the MTP block uses the row positions and documents of the main model (window-only,
   rope_theta, no YaRN, score-routed, never hash). The MTP target at t is targets[t+1] when t+1 < T,
   doc[t+1] == doc[t] (same document run) and targets[t+1] >= 0, else none. mtp_logits are reported at every
   position, including those without target.
13. J = (sum CE_main + mtp_loss_weight * sum CE_mtp + indexer_loss_weight * sum KL) / N_tgt + sum balance, with
   N_tgt the number of main targets >= 0 (raises when 0).
"""

MTP_PAD_ID = 0


# ----------------------------------------------------------------------------------------------------- config

def layer_ratio(cfg, layer):
    ratios = cfg.get("compress_ratios") or []
    return int(ratios[layer]) if layer < len(ratios) else 0


def is_csa(cfg, ratio):
    return ratio > 0 and ratio == int(cfg["csa_ratio"])


def check_supported(cfg):
    if cfg.get("indexer_fp4") and any(is_csa(cfg, layer_ratio(cfg, i)) for i in range(int(cfg["n_layers"]))):
        raise NotImplementedError("indexer_fp4 = true is not simulated by the reference")
    if cfg.get("kv_fp8"):
        raise NotImplementedError("kv_fp8 = true is not simulated by the reference")
    if cfg.get("score_func", "sqrtsoftplus") not in ("sqrtsoftplus", "sigmoid", "softmax"):
        raise ValueError(f"unknown score_func {cfg['score_func']}")
    if int(cfg.get("mtp_depth", 0)) not in (0, 1):
        raise ValueError("mtp_depth must be 0 or 1")


# ----------------------------------------------------------------------------------------------------- basics

def rms(x, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def rmsnorm_w(x, w, eps):
    return rms(x, eps) * w


def rope_inv_freq(cfg, compressed):
    """float32 inverse frequencies (r/2) of a layer: window-only layers rope_theta; compressed layers
    compress_rope_theta with YaRN when yarn_factor > 1 (see INTERPRETATIONS 1-2)."""
    r = int(cfg["rope_dim"])
    theta = float(cfg["compress_rope_theta"] if compressed else cfg["rope_theta"])
    inv = 1.0 / theta ** (np.arange(0, r, 2, dtype=np.float64) / r)
    factor = float(cfg.get("yarn_factor", 1.0))
    if compressed and factor > 1.0:
        orig = float(cfg["yarn_original_len"])

        def corr_dim(rot):
            return r * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(theta))

        low = max(math.floor(corr_dim(float(cfg["yarn_beta_fast"]))), 0)
        high = min(math.ceil(corr_dim(float(cfg["yarn_beta_slow"]))), r - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(r // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
        inv = inv / factor * ramp + inv * (1.0 - ramp)
    return torch.from_numpy(inv.astype(np.float32))


def rope(x, pos, inv_freq, inverse=False):
    """Interleaved RoPE on the last 2*len(inv_freq) dims of x (L, ..., c) at positions pos (L,)."""
    r = 2 * inv_freq.numel()
    if r == 0:
        return x
    ang = pos.to(torch.float32)[:, None] * inv_freq[None, :]  # float32 product
    ang = ang.to(x.dtype)
    if inverse:
        ang = -ang
    shape = (ang.shape[0],) + (1,) * (x.dim() - 2) + (r // 2,)
    cos, sin = ang.cos().reshape(shape), ang.sin().reshape(shape)
    pairs = x[..., x.shape[-1] - r:].reshape(*x.shape[:-1], r // 2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    rot = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1).reshape(*x.shape[:-1], r)
    return torch.cat([x[..., :x.shape[-1] - r], rot], -1)


def hadamard(n, dtype=torch.float64):
    if n & (n - 1):
        raise ValueError(f"Hadamard size {n} is not a power of two")
    h = torch.ones(1, 1, dtype=dtype)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def stable_topk_mask(scores, k, valid=None):
    """Boolean mask of the k (tensor (rows,) or int) largest entries per row among `valid`, ties to the lower index."""
    scores = scores.detach()
    if valid is not None:
        scores = torch.where(valid, scores, torch.full_like(scores, -math.inf))
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(scores.shape[-1]).expand_as(order).contiguous())
    k = torch.as_tensor(k)
    mask = rank < (k[..., None] if k.dim() else k)
    return mask if valid is None else mask & valid


def stable_topk_indices(scores, k):
    return torch.sort(scores.detach(), dim=-1, descending=True, stable=True).indices[..., :k]


def doc_runs(doc_row):
    """[(start, end)] of the maximal runs of equal doc id, and a run index per position."""
    d = doc_row.tolist()
    runs, run_of = [], []
    for t, v in enumerate(d):
        if t == 0 or v != d[t - 1]:
            runs.append([t, t + 1])
        else:
            runs[-1][1] = t + 1
        run_of.append(len(runs) - 1)
    return [tuple(r) for r in runs], torch.tensor(run_of, dtype=torch.long)


# ----------------------------------------------------------------------------------------------------- mHC

def sinkhorn(r, iters, eps):
    """Spec §3 order: row softmax + eps, column-normalise, then iters-1 rounds of {row, column}. r (..., n, n)."""
    c = torch.softmax(r, -1) + eps
    c = c / (c.sum(-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        c = c / (c.sum(-1, keepdim=True) + eps)
        c = c / (c.sum(-2, keepdim=True) + eps)
    return c


def hc_gates(x, fn, base, scale, cfg):
    """x (..., n, d) -> pre (..., n), post (..., n), comb (..., n, n)."""
    n = x.shape[-2]
    mix = rms(x.reshape(*x.shape[:-2], -1), float(cfg["norm_eps"])) @ fn.T
    eps = float(cfg["hc_eps"])
    pre = torch.sigmoid(scale[0] * mix[..., :n] + base[:n]) + eps
    post = 2 * torch.sigmoid(scale[1] * mix[..., n:2 * n] + base[n:2 * n])
    r = (scale[2] * mix[..., 2 * n:] + base[2 * n:]).reshape(*mix.shape[:-1], n, n)
    return pre, post, sinkhorn(r, int(cfg["hc_sinkhorn_iters"]), eps)


def hc_site(x, prefix, p, cfg, norm_w, sublayer):
    pre, post, comb = hc_gates(x, p[prefix + "fn"], p[prefix + "base"], p[prefix + "scale"], cfg)
    y = (pre[..., None] * x).sum(-2)
    f = sublayer(rmsnorm_w(y, norm_w, float(cfg["norm_eps"])))
    return post[..., None] * f[..., None, :] + torch.einsum("...jk,...jd->...kd", comb, x)


def hc_head(x, prefix, p, cfg):
    mix = rms(x.reshape(*x.shape[:-2], -1), float(cfg["norm_eps"])) @ p[prefix + "fn"].T
    w = torch.sigmoid(p[prefix + "scale"][0] * mix + p[prefix + "base"]) + float(cfg["hc_eps"])
    return (w[..., None] * x).sum(-2)


# ----------------------------------------------------------------------------------------------------- attention

def compress(h, wkv, wgate, ape, m, overlap):
    """One document's h (L, d) -> compressed entries (L // m, c) before the norm (spec §5/§6, docs/model.md)."""
    nb = h.shape[0] // m
    width = wkv.shape[0] // (2 if overlap else 1)
    if nb == 0:
        return h.new_zeros(0, width)
    x = h[:nb * m]
    kv = (x @ wkv.T).reshape(nb, m, -1)
    z = (x @ wgate.T).reshape(nb, m, -1) + ape
    if overlap:
        kv_b, kv_a = kv[..., :width], kv[..., width:]
        z_b, z_a = z[..., :width], z[..., width:]
        kv_prev = torch.cat([kv_b.new_zeros(1, m, width), kv_b[:-1]], 0)
        z_prev = torch.cat([z_b.new_full((1, m, width), -math.inf), z_b[:-1]], 0)
        kv = torch.cat([kv_prev, kv_a], 1)
        z = torch.cat([z_prev, z_a], 1)
    return (torch.softmax(z, 1) * kv).sum(1)


def compressed_entries(h_row, runs, prefix, p, cfg, m, overlap, inv_freq):
    """All compressed entries of one row: (S, c) after norm and RoPE, block starts (S,), run index (S,)."""
    outs, starts, run_ids = [], [], []
    for ri, (a, e) in enumerate(runs):
        c = compress(h_row[a:e], p[prefix + "wkv"], p[prefix + "wgate"], p[prefix + "ape"], m, overlap)
        nb = c.shape[0]
        if nb == 0:
            continue
        st = a + m * torch.arange(nb)
        c = rmsnorm_w(c, p[prefix + "norm"], float(cfg["norm_eps"]))
        outs.append(rope(c, st, inv_freq))
        starts.append(st)
        run_ids.append(torch.full((nb,), ri, dtype=torch.long))
    width = p[prefix + "norm"].shape[0]
    if not outs:
        return h_row.new_zeros(0, width), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.cat(outs), torch.cat(starts), torch.cat(run_ids)


def window_mask(run_of, window):
    t = torch.arange(run_of.numel())
    same = run_of[:, None] == run_of[None, :]
    return same & (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - window)


def visible_mask(run_of, starts, run_ids, m):
    t = torch.arange(run_of.numel())
    return (run_of[:, None] == run_ids[None, :]) & (starts[None, :] + m - 1 <= t[:, None])


def indexer_scores(h_row, cq_row, pos, runs, prefix, p, cfg, m, inv_freq):
    """Lightning indexer score (T, S) of one row (spec §5); FP4 is not simulated."""
    hi, ci = int(cfg["index_n_heads"]), int(cfg["index_head_dim"])
    had = hadamard(ci, h_row.dtype)
    q = (cq_row @ p[prefix + "wq_b"].T).reshape(-1, hi, ci)
    q = rope(q, pos, inv_freq) @ had
    k, _, _ = compressed_entries(h_row, runs, prefix + "compressor.", p, cfg, m, True, inv_freq)
    k = k @ had
    w = (h_row @ p[prefix + "weights_proj"].T) * (ci ** -0.5 * hi ** -0.5)
    return (torch.relu(torch.einsum("thc,sc->ths", q, k)) * w[..., None]).sum(1)


def attention(h, doc, prefix, p, cfg, ratio, diag):
    """Attention sublayer on h (B, T, d). Returns (B, T, d) and the summed indexer KL of this layer."""
    b_sz, t_len, _ = h.shape
    nh, c, r = int(cfg["n_heads"]), int(cfg["head_dim"]), int(cfg["rope_dim"])
    g, eps = int(cfg["o_groups"]), float(cfg["norm_eps"])
    csa = is_csa(cfg, ratio)
    inv_freq = rope_inv_freq(cfg, ratio > 0)
    pos = torch.arange(t_len)
    cq = rmsnorm_w(h @ p[prefix + "wq_a"].T, p[prefix + "q_norm"], eps)
    q = rms((cq @ p[prefix + "wq_b"].T).reshape(b_sz, t_len, nh, c), eps)
    kv = rmsnorm_w(h @ p[prefix + "wkv"].T, p[prefix + "kv_norm"], eps)
    outs, kl_total = [], h.new_zeros(())
    for b in range(b_sz):
        runs, run_of = doc_runs(doc[b])
        qb = rope(q[b], pos, inv_freq)
        keys = rope(kv[b], pos, inv_freq)
        mask = window_mask(run_of, int(cfg["window"]))
        sel = None
        if ratio > 0:
            comp, starts, run_ids = compressed_entries(h[b], runs, prefix + "compressor.", p, cfg, ratio, csa,
                                                       inv_freq)
            vis = visible_mask(run_of, starts, run_ids, ratio)
            if csa:
                score = indexer_scores(h[b].detach(), cq[b].detach(), pos, runs, prefix + "indexer.", p, cfg,
                                       ratio, inv_freq)
                nvis = vis.sum(-1)
                sel = stable_topk_mask(score, torch.clamp(nvis, max=int(cfg["index_topk"])), vis)
                diag.setdefault("indexer_margin", []).append(_topk_margin(score.detach(), sel, vis))
                vis = sel
            keys = torch.cat([keys, comp], 0)
            mask = torch.cat([mask, vis], 1)
        z = torch.einsum("thc,kc->thk", qb, keys) / math.sqrt(c)
        z = torch.where(mask[:, None, :], z, torch.full_like(z, -math.inf))
        sink = p[prefix + "sink"].reshape(1, nh, 1).expand(t_len, nh, 1)
        prob = torch.softmax(torch.cat([z, sink], -1), -1)[..., :-1]
        o = torch.einsum("thk,kc->thc", prob, keys)
        o = rope(o, pos, inv_freq, inverse=True)
        outs.append(o)
        if csa and float(cfg.get("indexer_loss_weight", 0.0)) > 0 and sel.any():
            kl_total = kl_total + indexer_kl(prob[..., t_len:].detach(), score, sel)
    o = torch.stack(outs).reshape(b_sz, t_len, g, nh * c // g)
    o = torch.einsum("btgi,gri->btgr", o, p[prefix + "wo_a"]).reshape(b_sz, t_len, -1)
    return o @ p[prefix + "wo_b"].T, kl_total


def _topk_margin(score, sel, vis):
    """(smallest nonzero gap between the lowest selected and the highest unselected visible score, number of
    queries whose cut falls between equal scores) -- how close the selection is to a flip."""
    if score.shape[-1] == 0:
        return math.inf, 0
    lo = torch.where(sel, score, torch.full_like(score, math.inf)).min(-1).values
    hi = torch.where(vis & ~sel, score, torch.full_like(score, -math.inf)).max(-1).values
    gap = (lo - hi)[torch.isfinite(lo - hi)]
    nonzero = gap[gap > 0]
    return (float(nonzero.min()) if nonzero.numel() else math.inf, int((gap == 0).sum()))


def indexer_kl(p_comp, score, sel):
    """sum_t KL(p_t || softmax(score_t over sel_t)) over rows with >= 1 selected entry; p_comp (T, H, S) detached."""
    rows = sel.any(-1)
    pc, sc, sl = p_comp[rows].sum(1), score[rows], sel[rows]
    pc = torch.where(sl, pc, torch.zeros_like(pc))
    pn = pc / pc.sum(-1, keepdim=True)
    logq = torch.log_softmax(torch.where(sl, sc, torch.full_like(sc, -math.inf)), -1)
    logq = torch.where(sl, logq, torch.zeros_like(logq))
    return (torch.xlogy(pn, pn) - pn * logq).sum()


# ----------------------------------------------------------------------------------------------------- MoE

def swiglu(x, w1, w2, w3, limit):
    gate, up = x @ w1.T, x @ w3.T
    if limit > 0:
        gate = torch.clamp(gate, max=limit)
        up = torch.clamp(up, -limit, limit)
    return (F.silu(gate) * up) @ w2.T


def router_scores(logits, func):
    if func == "sqrtsoftplus":
        return torch.sqrt(torch.log1p(torch.exp(-logits.abs())) + torch.clamp(logits, min=0))
    if func == "sigmoid":
        return torch.sigmoid(logits)
    return torch.softmax(logits, -1)


def moe(h, ids, prefix, p, cfg, hash_layer, diag):
    """MoE sublayer on h (B, T, d). Returns (B, T, d) and the balance loss (0 for hash layers)."""
    b_sz, t_len, d = h.shape
    e_n, k = int(cfg["n_routed_experts"]), int(cfg["n_activated_experts"])
    func, limit = cfg.get("score_func", "sqrtsoftplus"), float(cfg["swiglu_limit"])
    x = h.reshape(-1, d)
    s = router_scores(x @ p[prefix + "gate.weight"].T, func)
    if hash_layer:
        idx = p[prefix + "gate.tid2eid"].long()[ids.reshape(-1).long()]
    else:
        biased = s.detach() + p[prefix + "gate.bias"].detach().to(s.dtype)
        idx = stable_topk_indices(biased, k)
        srt = torch.sort(biased, -1, descending=True).values
        if e_n > k:
            diag.setdefault("router_margin", []).append(float((srt[:, k - 1] - srt[:, k]).min()))
    sw = s.gather(1, idx)
    gw = (sw if func == "softmax" else sw / sw.sum(-1, keepdim=True)) * float(cfg["route_scale"])
    out = torch.zeros_like(x)
    for e in range(e_n):
        tok, slot = (idx == e).nonzero(as_tuple=True)
        if tok.numel() == 0:
            continue
        y = swiglu(x[tok], p[prefix + "experts.w1"][e], p[prefix + "experts.w2"][e], p[prefix + "experts.w3"][e],
                   limit)
        out = out.index_add(0, tok, gw[tok, slot, None] * y)
    if int(cfg["n_shared_experts"]) > 0:
        out = out + swiglu(x, p[prefix + "shared.w1"], p[prefix + "shared.w2"], p[prefix + "shared.w3"], limit)
    balance = h.new_zeros(())
    if not hash_layer:
        counts = F.one_hot(idx, e_n).sum(1).reshape(b_sz, t_len, e_n).sum(1).to(h.dtype)  # (B, E)
        f = counts * (e_n / (k * t_len))
        pr = (s / s.sum(-1, keepdim=True)).reshape(b_sz, t_len, e_n).mean(1)
        balance = float(cfg["balance_loss_weight"]) * (f * pr).sum(-1).mean()
    return out.reshape(b_sz, t_len, d), balance


# ----------------------------------------------------------------------------------------------------- model

def block(x, ids, doc, prefix, p, cfg, ratio, hash_layer, diag):
    terms = {}

    def attn(h):
        out, terms["kl"] = attention(h, doc, prefix + "attn.", p, cfg, ratio, diag)
        return out

    def ffn(h):
        out, terms["balance"] = moe(h, ids, prefix + "ffn.", p, cfg, hash_layer, diag)
        return out

    x = hc_site(x, prefix + "hc_attn.", p, cfg, p[prefix + "attn_norm"], attn)
    x = hc_site(x, prefix + "hc_ffn.", p, cfg, p[prefix + "ffn_norm"], ffn)
    return x, terms["kl"], terms["balance"]


def mtp_targets(targets, doc):
    b_sz, t_len = targets.shape
    out = torch.full_like(targets, -1)
    for b in range(b_sz):
        _, run_of = doc_runs(doc[b])
        same = run_of[1:] == run_of[:-1]
        nxt = targets[b, 1:]
        out[b, :-1] = torch.where(same & (nxt >= 0), nxt, torch.full_like(nxt, -1))
    return out


def forward(params, cfg, ids, targets, doc, mtp_pad_id=MTP_PAD_ID):
    """The objective J (docs/model.md) and its parts. params: name -> tensor (float64 recommended)."""
    check_supported(cfg)
    p = params
    ids, targets, doc = ids.long(), targets.long(), doc.long()
    n, eps = int(cfg["hc_mult"]), float(cfg["norm_eps"])
    diag = {}
    emb = p["tok_embeddings"]
    x = emb[ids][:, :, None, :].expand(-1, -1, n, -1)
    kl_sum, balance = x.new_zeros(()), []
    for layer in range(int(cfg["n_layers"])):
        ratio = layer_ratio(cfg, layer)
        x, kl, bal = block(x, ids, doc, f"layers.{layer}.", p, cfg, ratio, layer < int(cfg["n_hash_layers"]), diag)
        kl_sum = kl_sum + kl
        if layer >= int(cfg["n_hash_layers"]):
            balance.append(bal)
    logits = rmsnorm_w(hc_head(x, "hc_head.", p, cfg), p["norm"], eps) @ p["output"].T
    valid = targets >= 0
    n_tgt = int(valid.sum())
    if n_tgt == 0:
        raise ValueError("the batch has no main targets")
    ce_main = F.cross_entropy(logits[valid], targets[valid], reduction="sum")
    total = ce_main + float(cfg.get("indexer_loss_weight", 0.0)) * kl_sum
    mtp_logits, ce_mtp = None, None
    if int(cfg.get("mtp_depth", 0)) == 1:
        nxt = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], mtp_pad_id)], 1)
        e = rmsnorm_w(emb[nxt], p["mtp.e_norm"], eps)
        hm = rmsnorm_w(x, p["mtp.h_norm"], eps)
        xm = (e @ p["mtp.e_proj"].T)[:, :, None, :] + hm @ p["mtp.h_proj"].T
        xm, _, bal = block(xm, ids, doc, "mtp.block.", p, cfg, 0, False, diag)
        balance.append(bal)
        mtp_logits = rmsnorm_w(hc_head(xm, "mtp.hc_head.", p, cfg), p["mtp.norm"], eps) @ p["output"].T
        mt = mtp_targets(targets, doc)
        mv = mt >= 0
        ce_mtp = F.cross_entropy(mtp_logits[mv], mt[mv], reduction="sum") if mv.any() else x.new_zeros(())
        total = total + float(cfg["mtp_loss_weight"]) * ce_mtp
    bal_sum = torch.stack(balance).sum() if balance else x.new_zeros(())
    objective = total / n_tgt + bal_sum
    return dict(objective=objective, loss=ce_main / n_tgt, logits=logits, mtp_logits=mtp_logits, ce_mtp=ce_mtp,
                kl=kl_sum, balance=balance, n_tgt=n_tgt, diag=diag)


# ----------------------------------------------------------------------------------------------------- parameters

BUFFER_SUFFIXES = ("ffn.gate.bias", "ffn.gate.tid2eid")


def is_buffer(name):
    return name.endswith(BUFFER_SUFFIXES)


def _layer_shapes(cfg, pre, ratio, hash_layer):
    d, n = int(cfg["dim"]), int(cfg["hc_mult"])
    nh, c, dc = int(cfg["n_heads"]), int(cfg["head_dim"]), int(cfg["q_lora_rank"])
    g, dg = int(cfg["o_groups"]), int(cfg["o_lora_rank"])
    e_n, f_dim, k = int(cfg["n_routed_experts"]), int(cfg["moe_inter_dim"]), int(cfg["n_activated_experts"])
    hi, ci = int(cfg["index_n_heads"]), int(cfg["index_head_dim"])
    ns, v = int(cfg["n_shared_experts"]), int(cfg["vocab_size"])
    mix = 2 * n + n * n
    s = {}
    for site in ("hc_attn", "hc_ffn"):
        s[f"{pre}{site}.fn"], s[f"{pre}{site}.base"], s[f"{pre}{site}.scale"] = (mix, n * d), (mix,), (3,)
    s[pre + "attn_norm"] = s[pre + "ffn_norm"] = (d,)
    a = pre + "attn."
    s.update({a + "wq_a": (dc, d), a + "q_norm": (dc,), a + "wq_b": (nh * c, dc), a + "wkv": (c, d),
              a + "kv_norm": (c,), a + "sink": (nh,), a + "wo_a": (g, dg, nh * c // g), a + "wo_b": (d, g * dg)})
    if ratio > 0:
        sc = 2 * c if is_csa(cfg, ratio) else c
        s.update({a + "compressor.wkv": (sc, d), a + "compressor.wgate": (sc, d),
                  a + "compressor.ape": (ratio, sc), a + "compressor.norm": (c,)})
    if is_csa(cfg, ratio):
        ix = a + "indexer."
        s.update({ix + "wq_b": (hi * ci, dc), ix + "weights_proj": (hi, d),
                  ix + "compressor.wkv": (2 * ci, d), ix + "compressor.wgate": (2 * ci, d),
                  ix + "compressor.ape": (ratio, 2 * ci), ix + "compressor.norm": (ci,)})
    fp = pre + "ffn."
    s.update({fp + "gate.weight": (e_n, d), fp + "gate.bias": (e_n,), fp + "experts.w1": (e_n, f_dim, d),
              fp + "experts.w3": (e_n, f_dim, d), fp + "experts.w2": (e_n, d, f_dim)})
    if hash_layer:
        s[fp + "gate.tid2eid"] = (v, k)
    if ns > 0:
        s.update({fp + "shared.w1": (ns * f_dim, d), fp + "shared.w3": (ns * f_dim, d),
                  fp + "shared.w2": (d, ns * f_dim)})
    return s


def param_shapes(cfg):
    """Every parameter and buffer of docs/model.md's table for this config: name -> shape."""
    d, n, v = int(cfg["dim"]), int(cfg["hc_mult"]), int(cfg["vocab_size"])
    s = {"tok_embeddings": (v, d)}
    for layer in range(int(cfg["n_layers"])):
        s.update(_layer_shapes(cfg, f"layers.{layer}.", layer_ratio(cfg, layer), layer < int(cfg["n_hash_layers"])))
    s.update({"hc_head.fn": (n, n * d), "hc_head.base": (n,), "hc_head.scale": (1,), "norm": (d,), "output": (v, d)})
    if int(cfg.get("mtp_depth", 0)) == 1:
        s.update({"mtp.e_norm": (d,), "mtp.h_norm": (d,), "mtp.e_proj": (d, d), "mtp.h_proj": (d, d),
                  "mtp.hc_head.fn": (n, n * d), "mtp.hc_head.base": (n,), "mtp.hc_head.scale": (1,),
                  "mtp.norm": (d,)})
        s.update(_layer_shapes(cfg, "mtp.block.", 0, False))
    return s


def init_params(cfg, seed=0, std=0.1, dtype=torch.float64):
    """Random values for every parameter (self-test only): N(0, std) matrices, norms near 1, random small biases
    so that every term is exercised; tid2eid random distinct experts per token."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in param_shapes(cfg).items():
        if name.endswith("tid2eid"):
            e_n = int(cfg["n_routed_experts"])
            out[name] = torch.stack([torch.randperm(e_n, generator=gen)[:shape[1]] for _ in range(shape[0])]
                                    ).to(torch.int32)
            continue
        x = torch.randn(shape, generator=gen, dtype=dtype)
        last = name.rsplit(".", 1)[-1]
        if last in ("attn_norm", "ffn_norm", "norm", "q_norm", "kv_norm", "e_norm", "h_norm"):
            x = 1 + 0.1 * x
        elif last == "scale":
            x = 0.5 + 0.1 * x
        elif last in ("base", "ape", "sink", "bias"):
            x = 0.3 * x
        else:
            x = std * x
        out[name] = x
    return out
