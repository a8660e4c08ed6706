"""Generate tests/data/spec_vectors.json and spec_vectors_rademacher.json from the reference (run
once; the files are committed).

    python tests/make_spec_vectors.py              # regenerate the JSON files and their text forms
    python tests/make_spec_vectors.py --txt-only   # rewrite only the text forms from the JSON files

It also writes tests/data/spec_vectors.txt, the same Gaussian vectors for the C++ test (tests/cpp):
one line per vector, "seed stream offset bits0 bits1 ...", seed/stream/offset in decimal, bits in hex;
and tests/data/spec_vectors_rademacher.txt: "seed stream offset signs", the signs a string of + and -.
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
# Rademacher: 160 consecutive signs cross every word of a block and a block boundary; offsets on either
# side of word and block edges.
RAD_OFFSETS = [0, 31, 100, 127 * 128 + 90, (1 << 32) - 70, (1 << 40) + 3]
RAD_SPAN = 160


DATA = os.path.join(os.path.dirname(__file__), "data")


def write_txt(rows):
    out = os.path.join(DATA, "spec_vectors.txt")
    with open(out, "w") as fh:
        fh.write("# kseed spec vectors (generated from spec_vectors.json by tests/make_spec_vectors.py)\n")
        fh.write("# seed stream offset bits(offset) bits(offset+1) ...\n")
        for r in rows:
            fh.write("%s %d %d %s\n" % (r["seed"], r["stream"], r["offset"], " ".join(r["bits"])))
    print(f"wrote {len(rows)} rows to {out}")


def write_rademacher_txt(rows):
    out = os.path.join(DATA, "spec_vectors_rademacher.txt")
    with open(out, "w") as fh:
        fh.write("# kseed Rademacher spec vectors (generated from spec_vectors_rademacher.json by "
                 "tests/make_spec_vectors.py)\n")
        fh.write("# seed stream offset signs(offset ...), + for r = +1, - for r = -1\n")
        for r in rows:
            fh.write("%s %d %d %s\n" % (r["seed"], r["stream"], r["offset"], r["signs"]))
    print(f"wrote {len(rows)} rows to {out}")


def make_rademacher():
    rows = []
    for seed in SEEDS:
        for stream in STREAMS:
            for off in RAD_OFFSETS:
                r = reference.rademacher(seed, RAD_SPAN, stream, off)
                rows.append({"seed": str(seed), "stream": stream, "offset": off,
                             "signs": "".join("+" if x > 0 else "-" for x in r.tolist())})
    out = os.path.join(DATA, "spec_vectors_rademacher.json")
    with open(out, "w") as fh:
        json.dump({"spec_version": 2,
                   "doc": "r(seed, stream, offset + j) for j = 0..len(signs)-1: + is +1, - is -1",
                   "vectors": rows}, fh, indent=0)
        fh.write("\n")
    print(f"wrote {len(rows)} rows to {out}")
    write_rademacher_txt(rows)


def main():
    if "--txt-only" in sys.argv[1:]:
        with open(os.path.join(DATA, "spec_vectors.json")) as fh:
            write_txt(json.load(fh)["vectors"])
        with open(os.path.join(DATA, "spec_vectors_rademacher.json")) as fh:
            write_rademacher_txt(json.load(fh)["vectors"])
        return
    if "--rademacher-only" in sys.argv[1:]:
        make_rademacher()
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
    make_rademacher()


if __name__ == "__main__":
    main()
