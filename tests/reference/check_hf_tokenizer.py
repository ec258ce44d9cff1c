#!/usr/bin/env python3
"""The Hugging Face check for Tessera's SentencePiece tokenizer: AutoTokenizer, loaded from Tessera's export,
must give Tessera's ids for every test string (and decode them back to the string).

usage: check_hf_tokenizer.py EXPORT_DIR CASES_FILE
CASES_FILE (written by test_sp_tokenizer's SpTokenizer.DISABLED_DumpForHf) holds, per case, a line
"<bytes> <specials> <n> <ids...>" then the raw UTF-8 text and a newline. specials=1: the ids come from
encode_with_specials, since Hugging Face recognises special-token strings in text; 0: from plain encode."""
import sys

from transformers import AutoTokenizer


def read_cases(path):
    data = open(path, "rb").read()
    pos, cases = 0, []
    while pos < len(data):
        end = data.index(b"\n", pos)
        nbytes, specials, n, *ids = map(int, data[pos:end].split())
        assert len(ids) == n, f"case {len(cases)}: malformed id list"
        text = data[end + 1:end + 1 + nbytes].decode("utf-8")
        pos = end + 1 + nbytes + 1
        cases.append((text, bool(specials), ids))
    return cases


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    tok = AutoTokenizer.from_pretrained(sys.argv[1])
    cases = read_cases(sys.argv[2])
    failures, n_ids, n_bytes = 0, 0, 0
    for i, (text, specials, want) in enumerate(cases):
        got = tok.encode(text)  # default arguments: the export adds no BOS/EOS
        back = tok.decode(got)
        if got != want or back != text:
            failures += 1
            if failures <= 5:
                first = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
                print(f"case {i} ({'specials' if specials else 'plain'}, {len(text)} chars): ids differ at {first}: "
                      f"hf {got[first:first + 8]} tessera {want[first:first + 8]}; decode equal: {back == text}; "
                      f"text {text[:80]!r}")
        n_ids += len(want)
        n_bytes += len(text.encode("utf-8"))
    print(f"{type(tok).__name__} vocab {len(tok)}: {len(cases) - failures}/{len(cases)} cases identical "
          f"({n_ids} ids, {n_bytes} bytes, {sum(c[1] for c in cases)} with specials)")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
