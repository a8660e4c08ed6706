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


CSRC = os.path.join(os.path.dirname(__file__), "..", "csrc")


def test_dtype_and_rounding_codes_match_kseed_types_h():
    text = open(os.path.join(CSRC, "kseed_types.h")).read()
    dtype = re.search(r"enum class DType\s*:\s*int\s*\{([^}]*)\}", text).group(1)
    codes = {m.group(1): int(m.group(2)) for m in re.finditer(r"(\w+)\s*=\s*(\d+)", dtype)}
    assert codes == {"F32": S.DTYPE_F32, "BF16": S.DTYPE_BF16, "F16": S.DTYPE_F16}
    assert sorted(S.DTYPE_CODES.values()) == sorted(codes.values())
    rounding = re.search(r"enum Rounding\s*:\s*int\s*\{([^}]*)\}", text).group(1)
    codes = {m.group(1): int(m.group(2)) for m in re.finditer(r"(\w+)\s*=\s*(\d+)", rounding)}
    assert codes == {"kRoundNearest": S.ROUND_NEAREST, "kRoundStochastic": S.ROUND_STOCHASTIC}
    assert S.ROUNDING_CODES == {"nearest": S.ROUND_NEAREST, "stochastic": S.ROUND_STOCHASTIC}


def test_plan_fields_match_kseed_plan_h():
    """Triton's int64 plan table has one row per field of the C++ PlanRow, in the same order."""
    text = open(os.path.join(CSRC, "kseed_plan.h")).read()
    body = re.search(r"struct PlanRow\s*\{([^}]*)\}", text).group(1)
    fields = [m.group(1) for m in re.finditer(r"^\s*[\w:* ]+?\b(\w+);", body, re.M)]
    assert [f for f in fields if f != "reserved"] == list(S.PLAN_FIELDS)
    assert [S.PLAN_SRC, S.PLAN_DST, S.PLAN_NUMEL, S.PLAN_STREAM, S.PLAN_FIRST_TILE] == \
        [S.PLAN_FIELDS.index(f) for f in ("src", "dst", "numel", "stream", "first_tile")]
