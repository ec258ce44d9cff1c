#!/usr/bin/env python3
r"""Training throughput of Hugging Face LlamaForCausalLM on CPU (fp32, SDPA attention, AdamW).

The PyTorch side of the dense-model comparison with Tessera's trainer at the same configuration.
Prints one JSON line per mode to stdout; the BLAS/threading setup goes to stderr.

Example:
  bench/torch_dense.py --dim 128 --n-layers 2 --n-heads 4 --n-kv-heads 2 --ffn-dim 384 \
      --vocab-size 1024 --seq-len 64 --batch-size 4 --steps 3 --mode both
"""
import argparse
import json
import re
import sys
import time

import torch
import torch.nn.functional as F
import transformers
from transformers import LlamaConfig, LlamaForCausalLM


def blas_info():
    """One line naming the BLAS, oneDNN, CPU capability and threads torch uses."""
    show = torch.__config__.show()
    fields = [f"{k}={v}" for k, v in re.findall(r"\b(BLAS_INFO|LAPACK_INFO)=([^,\s]+)", show)]
    cap = re.search(r"CPU capability usage: (\S+)", show)
    backend = re.search(r"ATen parallel backend: (.+)", torch.__config__.parallel_info())
    fields += [f"mkl={torch.backends.mkl.is_available()}",
               f"mkldnn={torch.backends.mkldnn.is_available()}",
               f"cpu_capability={cap.group(1) if cap else '?'}",
               f"parallel={backend.group(1).strip() if backend else '?'}",
               f"threads={torch.get_num_threads()}"]
    return f"torch {torch.__version__}: " + ", ".join(fields)


def build_model(a):
    cfg = LlamaConfig(
        hidden_size=a.dim, intermediate_size=a.ffn_dim, num_hidden_layers=a.n_layers,
        num_attention_heads=a.n_heads, num_key_value_heads=a.n_kv_heads, head_dim=a.dim // a.n_heads,
        vocab_size=a.vocab_size, max_position_embeddings=a.seq_len, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        use_cache=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).float().train()


def run(a, compile_model, rec):
    """Time a.steps training steps after a.warmup; record params, tokens/s, step ms in rec."""
    model = build_model(a)
    rec["params"] = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, betas=(0.9, 0.95), weight_decay=0.1)
    fwd = torch.compile(model) if compile_model else model
    gen = torch.Generator().manual_seed(1234)

    def step():
        ids = torch.randint(a.vocab_size, (a.batch_size, a.seq_len), generator=gen)
        tgt = torch.randint(a.vocab_size, (a.batch_size, a.seq_len), generator=gen)
        logits = fwd(input_ids=ids).logits
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), tgt.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    for _ in range(a.warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        loss = step()
    elapsed = time.perf_counter() - t0
    rec.update(tokens_per_s=round(a.batch_size * a.seq_len * a.steps / elapsed, 1),
               step_ms=round(1e3 * elapsed / a.steps, 2), final_loss=round(loss, 4))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 2)[2])
    for name, default in [("dim", 512), ("n-layers", 8), ("n-heads", 8), ("n-kv-heads", None),
                          ("ffn-dim", 1408), ("vocab-size", 32000), ("seq-len", 512),
                          ("batch-size", 8), ("steps", 10), ("warmup", 3), ("threads", None)]:
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--mode", choices=["eager", "compile", "both"], default="eager")
    ap.add_argument("--lr", type=float, default=3e-4)
    a = ap.parse_args()
    a.n_kv_heads = a.n_kv_heads or a.n_heads
    if a.dim % a.n_heads or a.n_heads % a.n_kv_heads:
        ap.error("need dim % n_heads == 0 and n_heads % n_kv_heads == 0")
    if a.steps < 1:
        ap.error("--steps must be >= 1")

    if a.threads:
        torch.set_num_threads(a.threads)
    transformers.logging.set_verbosity_error()
    print(blas_info(), file=sys.stderr)

    config = {k: getattr(a, k) for k in ["dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim",
                                         "vocab_size", "seq_len", "batch_size", "steps", "warmup", "lr"]}
    modes = ["eager", "compile"] if a.mode == "both" else [a.mode]
    ok = 0
    for mode in modes:
        rec = {"impl": f"pytorch-{mode}", "tokens_per_s": None, "step_ms": None}
        try:
            run(a, mode == "compile", rec)
            ok += 1
        except Exception as e:  # torch.compile needs a working C++ toolchain; report, go on
            if mode != "compile":
                raise
            msg = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            print(f"torch_dense: torch.compile failed: {msg}", file=sys.stderr)
            rec["error"] = msg
        rec.update(threads=torch.get_num_threads(), torch=torch.__version__,
                   transformers=transformers.__version__, **config)
        print(json.dumps(rec), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
