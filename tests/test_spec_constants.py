"""The spec constants in kseed_kernels/_spec.py and csrc/kseed_spec.h are the same numbers."""
import os
import re

from kseed_kernels import _spec as S

HEADER = os.path.join(os.path.dirname(__file__), "..", "csrc", "kseed_spec.h")


def _header_values():
    text = open(HEADER).read()
    return {m.group(1): int(m.group(2), 16) for m in re.finditer(r"(\w+)\s*=\s*0x([0-9A-Fa-f]+)u", text)}


def test_header_matches_python():
    h = _header_values()
    for name in ("PHILOX_M0", "PHILOX_M1", "PHILOX_W0", "PHILOX_W1", "LN2_HI_BITS", "LN2_LO_BITS",
                 "SQRT2_MANT"):
        assert h[name] == getattr(S, name), name
    assert [h[f"LOG_C{i}"] for i in range(10)] == list(S.LOG_COEF_BITS)
    assert [h[f"SIN_C{i}"] for i in range(5)] == list(S.SIN_COEF_BITS)
    assert [h[f"COS_C{i}"] for i in range(5)] == list(S.COS_COEF_BITS)


def test_spec_md_lists_the_same_coefficients():
    spec = open(os.path.join(os.path.dirname(__file__), "..", "docs", "SPEC.md")).read().lower()
    for bits in S.LOG_COEF_BITS + S.SIN_COEF_BITS + S.COS_COEF_BITS + (S.LN2_HI_BITS, S.LN2_LO_BITS):
        assert "%08x" % bits in spec


def test_ln2_split_is_exact_enough():
    assert abs((S.LN2_HI + S.LN2_LO) - 0.6931471805599453) < 1e-12
    # LN2_HI has at most 17 significant bits, so e * LN2_HI is exact for |e| <= 31.
    mant = (S.LN2_HI_BITS & 0x7FFFFF) | 0x800000
    assert (mant & ((1 << 7) - 1)) == 0
