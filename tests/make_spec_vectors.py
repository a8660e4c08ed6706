"""Generate tests/data/spec_vectors.json from the reference (run once; the file is committed).

    python tests/make_spec_vectors.py
"""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from kseed_kernels import reference  # noqa: E402

SEEDS = [0, 1, 42, 0xFFFFFFFF, 1 << 32, 0x0123456789ABCDEF, 1 << 63, (1 << 64) - 1]
STREAMS = [0, 1, 0x7FFFFFFF, 1 << 31, 0xFFFFFFFF]
OFFSETS = [0, 5, 1021, (1 << 32) - 6, (1 << 40) + 3]
SPAN = 8  # consecutive indices from each offset: every lane, two blocks or more


def main():
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


if __name__ == "__main__":
    main()
