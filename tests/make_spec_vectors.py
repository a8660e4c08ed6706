"""Generate tests/data/spec_vectors.json from the reference (run once; the file is committed).

    python tests/make_spec_vectors.py              # regenerate the JSON and its text form
    python tests/make_spec_vectors.py --txt-only   # rewrite only the text form from the JSON

It also writes tests/data/spec_vectors.txt, the same vectors for the C++ test (tests/cpp): one line
per vector, "seed stream offset bits0 bits1 ...", seed/stream/offset in decimal, bits in hex.
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from kseed_kernels import torch_reference as reference  # noqa: E402

SEEDS = [0, 1, 42, 0xFFFFFFFF, 1 << 32, 0x0123456789ABCDEF, 1 << 63, (1 << 64) - 1]
STREAMS = [0, 1, 0x7FFFFFFF, 1 << 31, 0xFFFFFFFF]
OFFSETS = [0, 5, 1021, (1 << 32) - 6, (1 << 40) + 3]
SPAN = 8  # consecutive indices from each offset: every lane, two blocks or more


DATA = os.path.join(os.path.dirname(__file__), "data")


def write_txt(rows):
    out = os.path.join(DATA, "spec_vectors.txt")
    with open(out, "w") as fh:
        fh.write("# kseed spec vectors (generated from spec_vectors.json by tests/make_spec_vectors.py)\n")
        fh.write("# seed stream offset bits(offset) bits(offset+1) ...\n")
        for r in rows:
            fh.write("%s %d %d %s\n" % (r["seed"], r["stream"], r["offset"], " ".join(r["bits"])))
    print(f"wrote {len(rows)} rows to {out}")


def main():
    if "--txt-only" in sys.argv[1:]:
        with open(os.path.join(DATA, "spec_vectors.json")) as fh:
            write_txt(json.load(fh)["vectors"])
        return
    rows = []
    for seed in SEEDS:
        for stream in STREAMS:
            for off in OFFSETS:
                z = reference.gaussian(seed, SPAN, stream, off)
                bits = z.view(torch.int32).tolist()
                rows.append({"seed": str(seed), "stream": stream, "offset": off,
                             "bits": ["%08x" % (b & 0xFFFFFFFF) for b in bits]})
    out = os.path.join(os.path.dirname(__file__), "data", "spec_vectors.json")
    with open(out, "w") as fh:
        json.dump({"spec_version": 1,
                   "doc": "z(seed, stream, offset + j) as float32 bit patterns, j = 0..len(bits)-1",
                   "vectors": rows}, fh, indent=0)
        fh.write("\n")
    print(f"wrote {len(rows)} rows to {out}")
    write_txt(rows)


if __name__ == "__main__":
    main()
