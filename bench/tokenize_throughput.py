#!/usr/bin/env python3
"""Tokenization throughput, one input, one SentencePiece model, one thread each: Tessera (`tessera data
prepare`, which also writes the HDF5 dataset), Python `sentencepiece` on the same .model, and Hugging Face
`tokenizers` on Tessera's tokenizer.json export of it. All encode line by line (the unit Tessera's
SentencePiece encode works in); the id counts must agree, which is checked.

usage: bench/tokenize_throughput.py TESSERA_BIN VOCAB_SIZE TEXT"""
import json
import os
import subprocess
import sys
import tempfile
import time

os.environ["RAYON_NUM_THREADS"] = "1"  # before tokenizers starts its thread pool: one thread, like the others
import sentencepiece as spm  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402


def best_of(n, f):
    best, result = float("inf"), None
    for _ in range(n):
        t0 = time.perf_counter()
        result = f()
        best = min(best, time.perf_counter() - t0)
    return best, result


def main(tessera, vocab, text):
    data = open(text, encoding="utf-8").read()
    lines = data.splitlines(keepends=True)
    n_bytes = len(data.encode("utf-8"))
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([tessera, "data", "tokenizer", text, "--out", f"{tmp}/tok", "--vocab-size", vocab,
                        "--hf-out", f"{tmp}/hf"], check=True, capture_output=True)
        model = f"{tmp}/tok.model"

        def run_tessera():
            out = subprocess.run([tessera, "data", "prepare", text, "--out", f"{tmp}/d.h5", "--tokenizer",
                                  "sentencepiece", "--tokenizer-model", model, "--val-fraction", "0"],
                                 check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
            return json.loads(out.stdout)["train_tokens"] - 1  # minus the document's EOS
        rows = [("tessera data prepare (includes writing HDF5)", *best_of(3, run_tessera))]
        sp = spm.SentencePieceProcessor(model_file=model)
        seconds, ids = best_of(3, lambda: sp.encode(lines))
        rows.append((f"python sentencepiece {spm.__version__}", seconds, sum(map(len, ids))))
        hf = Tokenizer.from_file(f"{tmp}/hf/tokenizer.json")
        seconds, enc = best_of(3, lambda: hf.encode_batch(lines, add_special_tokens=False))
        rows.append(("HF tokenizers encode_batch", seconds, sum(len(e.ids) for e in enc)))

    print(f"input: {text} ({n_bytes} bytes, {len(lines)} lines), vocabulary {vocab}, 1 thread each")
    for name, seconds, n_ids in rows:
        print(json.dumps({"impl": name, "seconds": round(seconds, 4), "MB_per_s": round(n_bytes / seconds / 1e6, 2),
                          "ids": n_ids, "tessera_speedup": round(seconds / rows[0][1], 2)}))
    if len({n for _, _, n in rows}) != 1:
        print("id counts differ", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
