#!/usr/bin/env python3
"""The independent oracle for the V4 model: Hugging Face's DeepseekV4ForCausalLM, loaded from Tessera's export
(`tessera ckpt export --format hf`), must give Tessera's logits on the same batch (max relative error 1e-4, fp32).

usage: check_v4_hf.py EXPORT_DIR DUMP.h5
  EXPORT_DIR  model.safetensors + config.json written by Tessera's Hugging Face export
  DUMP.h5     written by Tessera's V4 dump tool: batch/ids (B, T) int32, out/logits (B, T, V), root attribute
              config_json (the Tessera model config as JSON)

The two agree by construction only in the configuration listed in docs/model.md ("Hugging Face export"):
indexer_fp4 and kv_fp8 off, index_topk >= the number of CSA blocks of a row, one document per row (HF has no
packing), MTP excluded. This script refuses a dump outside it rather than report a meaningless mismatch.
Loading must be clean: any missing, unexpected or mismatched key, or a load warning about one, is a failure."""
import json
import logging
import sys

import h5py
import numpy as np
import torch

from oracle import Checks, rel_err  # noqa: E402  (tests/reference/oracle.py)

TOL = 1e-4


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def load_hf_v4(path, checks, dtype=torch.float32):
    """DeepseekV4ForCausalLM from PATH (eager attention, eval mode), or None; every loading problem is a failed
    check (a shape mismatch makes transformers raise: reported the same way)."""
    from transformers import DeepseekV4ForCausalLM

    records = _Records()
    root = logging.getLogger("transformers")  # the library's loggers propagate to it
    root.addHandler(records)
    try:
        model, info = DeepseekV4ForCausalLM.from_pretrained(
            path, dtype=dtype, attn_implementation="eager", output_loading_info=True)
    except (RuntimeError, ValueError, OSError) as e:
        checks.fail(f"loading {path}: {type(e).__name__}: {e}")
        return None
    finally:
        root.removeHandler(records)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        if info.get(kind):
            checks.fail(f"loading {path}: {kind}: {sorted(map(str, info[kind]))}")
    for msg in records.messages:
        low = msg.lower()
        if any(w in low for w in ("missing", "unexpected", "newly initialized", "not used", "mismatch")):
            checks.fail(f"loading {path}: warning: {msg.strip()}")
        else:
            print(f"note: transformers warned: {msg.strip()}")
    rotary = model.model.rotary_emb
    for kind in rotary.layer_types:
        scaling = getattr(rotary, f"{kind}_attention_scaling")
        if scaling != 1.0:  # V4 never scales cos/sin (YaRN's mscale must be off)
            checks.fail(f"rope '{kind}' has attention_scaling {scaling}, expected 1.0")
    return model.eval()


def agreed_configuration(cfg, T, checks):
    """Refuses (a failed check) a Tessera config outside the one where HF and Tessera agree by construction."""
    if cfg.get("indexer_fp4", False):
        checks.fail("dump config has indexer_fp4 = true: HF does not simulate FP4 in the indexer; dump with it off")
    if cfg.get("kv_fp8", False):
        checks.fail("dump config has kv_fp8 = true: HF does not simulate FP8 on KV entries; dump with it off")
    ratios = cfg.get("compress_ratios", [])[: cfg.get("n_layers", 0)]
    csa = cfg.get("csa_ratio", 4)
    if csa in ratios and cfg.get("index_topk", 0) < T // csa:
        print(f"warning: index_topk {cfg.get('index_topk')} < {T // csa} CSA blocks per row: HF and Tessera select "
              "the same entries only without exact score ties (torch.topk breaks ties unspecified, Tessera to the "
              "lower index); ties at score 0 (all ReLUs zero) are common in small models")
    if cfg.get("score_func", "sqrtsoftplus") == "softmax":
        checks.fail("score_func softmax is not expressible in HF (see docs/model.md)")


def main(export_dir, dump_path):
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    checks = Checks(TOL)
    with h5py.File(dump_path, "r") as f:
        ids = torch.from_numpy(f["batch/ids"][()].astype(np.int64))
        ours = f["out/logits"][()]
        raw = f.attrs.get("config_json")
        cfg = json.loads(raw.decode() if isinstance(raw, bytes) else raw) if raw is not None else {}
    B, T = ids.shape
    agreed_configuration(cfg, T, checks)
    model = load_hf_v4(export_dir, checks)
    if model is None:
        return checks.exit_code()
    if model.config.vocab_size != ours.shape[-1]:
        checks.fail(f"export vocab {model.config.vocab_size} != dump logits vocab {ours.shape[-1]}")
        return checks.exit_code()
    with torch.no_grad():
        theirs = model(input_ids=ids, use_cache=False).logits.float().numpy()
    err = rel_err(ours, theirs)
    print(f"logits B={B} T={T} V={ours.shape[-1]}: rel_err {err:.3e} (tolerance {TOL:g})")
    checks.check("logits (Tessera vs HF DeepseekV4ForCausalLM)", err)
    if not np.isfinite(theirs).all():
        checks.fail("HF logits are not finite")
    return checks.exit_code()


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))
