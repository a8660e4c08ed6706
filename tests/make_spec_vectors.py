"""Generate tests/data/spec_vectors.json and spec_vectors_rademacher.json from the reference (run
once; the files are committed).

    python tests/make_spec_vectors.py              # regenerate the JSON files and their text forms
    python tests/make_spec_vectors.py --txt-only   # rewrite only the text forms from the JSON files
    python tests/make_spec_vectors.py --rademacher-only   # only the Rademacher JSON and text files

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


def gaussian_rows():
    rows = []
    for seed in SEEDS:
        for stream in STREAMS:
            for off in OFFSETS:
                bits = reference.gaussian(seed, SPAN, stream, off).view(torch.int32).tolist()
                rows.append({"seed": str(seed), "stream": stream, "offset": off,
                             "bits": ["%08x" % (b & 0xFFFFFFFF) for b in bits]})
    return rows


def rademacher_rows():
    rows = []
    for seed in SEEDS:
        for stream in STREAMS:
            for off in RAD_OFFSETS:
                r = reference.rademacher(seed, RAD_SPAN, stream, off)
                rows.append({"seed": str(seed), "stream": stream, "offset": off,
                             "signs": "".join("+" if x > 0 else "-" for x in r.tolist())})
    return rows


# Each family's files: NAME.json (spec_version, doc, vectors) and NAME.txt for the C++ test, a line
# per vector "seed stream offset FIELD" under a two-line header naming the columns.
FAMILIES = {
    "gaussian": dict(name="spec_vectors", version=1, rows=gaussian_rows, title="spec vectors",
                     doc="z(seed, stream, offset + j) as float32 bit patterns, j = 0..len(bits)-1",
                     columns="bits(offset) bits(offset+1) ...", field=lambda r: " ".join(r["bits"])),
    "rademacher": dict(name="spec_vectors_rademacher", version=2, rows=rademacher_rows,
                       title="Rademacher spec vectors",
                       doc="r(seed, stream, offset + j) for j = 0..len(signs)-1: + is +1, - is -1",
                       columns="signs(offset ...), + for r = +1, - for r = -1", field=lambda r: r["signs"]),
}


def write_txt(fam, rows):
    out = os.path.join(DATA, fam["name"] + ".txt")
    with open(out, "w") as fh:
        fh.write(f"# kseed {fam['title']} (generated from {fam['name']}.json by "
                 "tests/make_spec_vectors.py)\n")
        fh.write(f"# seed stream offset {fam['columns']}\n")
        for r in rows:
            fh.write("%s %d %d %s\n" % (r["seed"], r["stream"], r["offset"], fam["field"](r)))
    print(f"wrote {len(rows)} rows to {out}")


def write_json(fam, rows):
    out = os.path.join(DATA, fam["name"] + ".json")
    with open(out, "w") as fh:
        json.dump({"spec_version": fam["version"], "doc": fam["doc"], "vectors": rows}, fh, indent=0)
        fh.write("\n")
    print(f"wrote {len(rows)} rows to {out}")


def main():
    args = sys.argv[1:]
    families = [FAMILIES["rademacher"]] if "--rademacher-only" in args else list(FAMILIES.values())
    for fam in families:
        if "--txt-only" in args:
            with open(os.path.join(DATA, fam["name"] + ".json")) as fh:
                rows = json.load(fh)["vectors"]
        else:
            rows = fam["rows"]()
            write_json(fam, rows)
        write_txt(fam, rows)


if __name__ == "__main__":
    main()
