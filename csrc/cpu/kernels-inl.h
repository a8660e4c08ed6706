// The CPU kernel source, written once (docs/SPEC.md): Philox4x32-10, the spec's log and sincos,
// Box-Muller, the accumulate / normals / Philox-words outputs and the final rounded write, over the
// vector type of one ISA.
//
// Included (no include guard, on purpose) by each ISA translation unit, inside its own namespace
// (kseed::cpu::<isa>) and target region, right after its vector header (vec_<isa>-inl.h), which
// provides:
//   kLanes (Philox blocks per vector = 32-bit lanes), kUnroll (vectors per step of the accumulate loop);
//   VF (float lanes), VU (uint32 lanes), VM (a lane mask from a compare);
//   set_u, set_f, iota, add / sub (VU and VF), mul, sqrt_f, floor_f, and_u, or_u, xor_u, xor3,
//   shl<k>, shr<k> (logical), max_i32, to_f32 (signed int32 -> float, exact here), as_f, as_u (bit casts),
//   gt_i32, lt_u32, lt_f, is_nan, lsb_set (masks); inc_where, select_u, select_f, zero_unless;
//   mulhilo (the 32x32 -> 64-bit products' halves), transpose4 (lane-major -> element order);
//   load_f, store_f, load_u, store_u, load_bf16, store_u16, load_f16, store_f16 (unaligned);
//   SW, sign_word(p), select_sign(c, nc, s, q) (the Rademacher term: s = sign_word(p) prepares the
//   32-element sign word *p; lane l gets nc = -c if bit q * kLanes + l of it is set, else c; kLanes
//   divides 32); kSignGroup (seeds per pass over the accumulator, 1 .. 8) and kSignRun (vectors of a sign
//   word whose accumulators stay in registers together), chosen for the ISA's register file.
// Every float operation below is one IEEE operation in the spec's order: mul then add, never an fma.
//
// Element order: a vector of Philox blocks first_block .. first_block + kLanes - 1 gives 4 * kLanes
// elements; lane b of word l is element 4 b + l, and transpose4 puts them in element order.
//
// A noise family is one accumulate function here and one member of the Kernels table, filled at the end
// of this file: accumulate_normals (Gaussian, sections 2-4) and sum_signs (Rademacher, section 8).
// The transpose of the apply (project_seeds, section 9) is project_normals and project_signs, over a
// block widened to float32 by widen.

// Philox round keys (the key bumped once per round), computed once per seed.
struct RoundKeys {
  uint32_t k0[spec::PHILOX_ROUNDS], k1[spec::PHILOX_ROUNDS];
};

inline RoundKeys round_keys(Key key) {
  RoundKeys rk;
  for (int r = 0; r < spec::PHILOX_ROUNDS; ++r) {
    rk.k0[r] = key.k0;
    rk.k1[r] = key.k1;
    key.k0 += spec::PHILOX_W0;
    key.k1 += spec::PHILOX_W1;
  }
  return rk;
}

KSEED_INLINE VF bits_f(uint32_t bits) { return as_f(set_u(bits)); }

// Philox4x32-10 of the blocks first_block .. first_block + kLanes - 1 (lane b: block first_block + b),
// counter words 2 and 3 = (stream, word3).
KSEED_INLINE void philox(const RoundKeys& rk, uint64_t first_block, uint32_t stream, uint32_t word3,
                         VU x[4]) {
  const VU lo = set_u(uint32_t(first_block));
  VU c0 = add(lo, iota());
  VU c1 = inc_where(set_u(uint32_t(first_block >> 32)), lt_u32(c0, lo));  // carry into word 1
  VU c2 = set_u(stream);
  VU c3 = set_u(word3);
  const VU m0 = set_u(spec::PHILOX_M0), m1 = set_u(spec::PHILOX_M1);
  for (int r = 0; r < spec::PHILOX_ROUNDS; ++r) {
    VU hi0, lo0, hi1, lo1;
    mulhilo(c0, m0, &hi0, &lo0);
    mulhilo(c2, m1, &hi1, &lo1);
    c0 = xor3(hi1, c1, set_u(rk.k0[r]));
    c2 = xor3(hi0, c3, set_u(rk.k1[r]));
    c1 = lo1;
    c3 = lo0;
  }
  x[0] = c0;
  x[1] = c1;
  x[2] = c2;
  x[3] = c3;
}

// log(u1), spec 3.2.
KSEED_INLINE VF log_uniform(VU xa) {
  const VU n1 = or_u(shl<1>(shr<9>(xa)), set_u(1));
  const VU bits = as_u(to_f32(n1));  // exact: n1 < 2^24
  const VU mant = and_u(bits, set_u(0x7FFFFFu));
  const VM big = gt_i32(mant, set_u(spec::SQRT2_MANT));  // both < 2^31
  const VU e = inc_where(sub(shr<23>(bits), set_u(127 + 24)), big);
  VF f = as_f(or_u(mant, set_u(0x3F800000u)));
  f = select_f(big, mul(f, set_f(0.5f)), f);
  const VF t = sub(f, set_f(1.0f));
  using namespace spec;
  VF p = bits_f(LOG_C9);
  p = add(mul(p, t), bits_f(LOG_C8));
  p = add(mul(p, t), bits_f(LOG_C7));
  p = add(mul(p, t), bits_f(LOG_C6));
  p = add(mul(p, t), bits_f(LOG_C5));
  p = add(mul(p, t), bits_f(LOG_C4));
  p = add(mul(p, t), bits_f(LOG_C3));
  p = add(mul(p, t), bits_f(LOG_C2));
  p = add(mul(p, t), bits_f(LOG_C1));
  p = add(mul(p, t), bits_f(LOG_C0));
  const VF logf_ = mul(t, p);
  const VF ef = to_f32(e);
  return add(mul(ef, bits_f(LN2_HI_BITS)), add(mul(ef, bits_f(LN2_LO_BITS)), logf_));
}

// (cos, sin) of 2 pi u2, spec 3.3.
KSEED_INLINE void sincos_uniform(VU xb, VF* cos_out, VF* sin_out) {
  const VU m2 = shr<9>(xb);
  const VU k = shr<21>(add(m2, set_u(1u << 20)));
  const VU j = sub(or_u(shl<1>(m2), set_u(1)), shl<22>(k));
  const VF y = mul(to_f32(j), set_f(4.76837158203125e-07f));  // 2^-21, exact
  const VF w = mul(y, y);
  using namespace spec;
  VF s = bits_f(SIN_C4);
  s = add(mul(s, w), bits_f(SIN_C3));
  s = add(mul(s, w), bits_f(SIN_C2));
  s = add(mul(s, w), bits_f(SIN_C1));
  s = add(mul(s, w), bits_f(SIN_C0));
  VF c = bits_f(COS_C4);
  c = add(mul(c, w), bits_f(COS_C3));
  c = add(mul(c, w), bits_f(COS_C2));
  c = add(mul(c, w), bits_f(COS_C1));
  c = add(mul(c, w), bits_f(COS_C0));
  s = mul(y, s);
  // q = k & 3: q odd swaps (c, s); cos is negated for q = 1, 2 (bit 1 of k + 1) and sin for q = 2, 3
  // (bit 1 of k).  Negation is an exact sign flip.
  const VM swap = lsb_set(k);
  const VF cs = select_f(swap, s, c);
  const VF sn = select_f(swap, c, s);
  const VU cos_sign = shl<30>(and_u(add(k, set_u(1)), set_u(2)));
  const VU sin_sign = shl<30>(and_u(k, set_u(2)));
  *cos_out = as_f(xor_u(as_u(cs), cos_sign));
  *sin_out = as_f(xor_u(as_u(sn), sin_sign));
}

// The spec's two normals of each lane's word pair (xa, xb).
KSEED_INLINE void box_muller(VU xa, VU xb, VF* za, VF* zb) {
  const VF r = sqrt_f(mul(log_uniform(xa), set_f(-2.0f)));
  VF c, s;
  sincos_uniform(xb, &c, &s);
  *za = mul(r, c);
  *zb = mul(r, s);
}

// The 4 * kLanes normals of blocks first_block .. first_block + kLanes - 1, in element order.
KSEED_INLINE void normals_group(const RoundKeys& rk, uint64_t first_block, uint32_t stream,
                                VF out[4]) {
  VU x[4];
  philox(rk, first_block, stream, spec::COUNTER_GAUSSIAN, x);
  VF z[4];
  box_muller(x[0], x[1], &z[0], &z[1]);
  box_muller(x[2], x[3], &z[2], &z[3]);
  transpose4(z, out);
}

// acc += c * z for U groups of blocks (U independent chains, for instruction-level overlap).
template <int U>
KSEED_INLINE void accumulate_step(const RoundKeys& rk, uint64_t first_block, uint32_t stream, VF cv,
                                  float* acc) {
  VF z[4 * U];
  KSEED_UNROLL
  for (int u = 0; u < U; ++u) normals_group(rk, first_block + uint64_t(u * kLanes), stream, z + 4 * u);
  KSEED_UNROLL
  for (int g = 0; g < 4 * U; ++g) store_f(acc + kLanes * g, add(load_f(acc + kLanes * g), mul(cv, z[g])));
}

static_assert(kGroupBlocks % kLanes == 0, "a SIMD group must be whole vectors of blocks");

void accumulate_normals(Key key, uint32_t stream, uint64_t first_block, int64_t nblocks, float c,
                        float* acc) {
  const RoundKeys rk = round_keys(key);
  const VF cv = set_f(c);
  constexpr int64_t step = int64_t(kUnroll) * kLanes;
  int64_t b = 0;
  for (; b + step <= nblocks; b += step) {
    accumulate_step<kUnroll>(rk, first_block + uint64_t(b), stream, cv, acc + 4 * b);
  }
  for (; b < nblocks; b += kLanes) {
    accumulate_step<1>(rk, first_block + uint64_t(b), stream, cv, acc + 4 * b);
  }
}

void normals(Key key, uint32_t stream, uint64_t first_block, int64_t nblocks, float* out) {
  const RoundKeys rk = round_keys(key);
  for (int64_t b = 0; b < nblocks; b += kLanes) {
    VF z[4];
    normals_group(rk, first_block + uint64_t(b), stream, z);
    for (int g = 0; g < 4; ++g) store_f(out + 4 * b + kLanes * g, z[g]);
  }
}

void philox_words(Key key, uint32_t stream, uint32_t word3, uint64_t first_block, int64_t nblocks,
                  uint32_t* out) {
  const RoundKeys rk = round_keys(key);
  for (int64_t b = 0; b < nblocks; b += kLanes) {
    VU x[4];
    philox(rk, first_block + uint64_t(b), stream, word3, x);
    VF z[4], o[4];
    for (int l = 0; l < 4; ++l) z[l] = as_f(x[l]);
    transpose4(z, o);
    for (int g = 0; g < 4; ++g) store_u(out + 4 * b + kLanes * g, as_u(o[g]));
  }
}

// ------------------------------------------------------------------------------ the Rademacher sum
// Spec section 8: element i's sign is bit (i & 31) of Philox word (i >> 5) & 3 of block i >> 7
// (counter word 3 = COUNTER_RADEMACHER), so philox_words of consecutive blocks is, word by word, the
// sign bits of consecutive runs of 32 elements.  The term is c or -c (an exact sign flip), added once.
//
// The cost per element-seed is a bit selection and one add; what would bound it is the accumulator's
// load and store, so kSignGroup seeds share one pass over the accumulator: the 32 elements of a sign
// word are loaded once (kSignPieces vectors), get their kSignGroup terms added in ascending k (the
// spec's order, element by element), and are stored once; each seed's word is prepared once for them.
// The group's Philox words (1/128 of a Philox call per element-seed) are computed first,
// into a small buffer.
static_assert(32 % kLanes == 0, "a vector of elements must lie in one 32-bit sign word");
constexpr int kSignPieces = 32 / kLanes;  // vectors per sign word
static_assert(kSignPieces % kSignRun == 0, "a sign word is whole runs");
// Words of the Philox blocks a call may touch: nwords <= kMaxSignWords from any word offset, the
// blocks rounded up to whole vectors of blocks.
constexpr int64_t kSignBufWords = 4 * (((kMaxSignWords + 3 + 3) / 4 + kLanes - 1) / kLanes * kLanes);

// acc[32 w + j] = a + t_0 + ... + t_(G-1) in that order, a = +0.0f for the first group (kFirst: no
// load, no separate zeroing pass) and acc[32 w + j] after it; seed g's sign words are
// words[g * kSignBufWords + w] (one base pointer: the seeds' words sit at fixed distances).  Out of
// line: one call per group of seeds, and bench/cpu_insn_count.py counts its loop.
template <int G, bool kFirst>
KSEED_NOINLINE void signs_pass(const uint32_t* words, const float* coefs, int64_t nwords, float* acc) {
  VF c[G], nc[G];
  for (int g = 0; g < G; ++g) {
    c[g] = set_f(coefs[g]);
    nc[g] = as_f(xor_u(as_u(c[g]), set_u(0x80000000u)));  // -c, exact
  }
  for (int64_t w = 0; w < nwords; ++w) {
    KSEED_UNROLL
    for (int r = 0; r < kSignPieces; r += kSignRun) {  // kSignRun vectors of the word stay in registers
      float* a = acc + 32 * w + kLanes * r;
      VF v[kSignRun];
      KSEED_UNROLL
      for (int q = 0; q < kSignRun; ++q) v[q] = kFirst ? set_f(0.0f) : load_f(a + kLanes * q);
      KSEED_UNROLL
      for (int g = 0; g < G; ++g) {  // ascending k, element by element
        const SW s = sign_word(words + g * kSignBufWords + w);
        KSEED_UNROLL
        for (int q = 0; q < kSignRun; ++q) v[q] = add(v[q], select_sign(c[g], nc[g], s, r + q));
      }
      KSEED_UNROLL
      for (int q = 0; q < kSignRun; ++q) store_f(a + kLanes * q, v[q]);
    }
  }
}

template <bool kFirst>
void signs_group(int G, const uint32_t* words, const float* cg, int64_t nwords, float* acc) {
  switch (G) {  // 1 <= G <= kSignGroup <= 8
    case 8: if constexpr (kSignGroup >= 8) signs_pass<8, kFirst>(words, cg, nwords, acc); break;
    case 7: if constexpr (kSignGroup >= 7) signs_pass<7, kFirst>(words, cg, nwords, acc); break;
    case 6: if constexpr (kSignGroup >= 6) signs_pass<6, kFirst>(words, cg, nwords, acc); break;
    case 5: if constexpr (kSignGroup >= 5) signs_pass<5, kFirst>(words, cg, nwords, acc); break;
    case 4: if constexpr (kSignGroup >= 4) signs_pass<4, kFirst>(words, cg, nwords, acc); break;
    case 3: if constexpr (kSignGroup >= 3) signs_pass<3, kFirst>(words, cg, nwords, acc); break;
    case 2: if constexpr (kSignGroup >= 2) signs_pass<2, kFirst>(words, cg, nwords, acc); break;
    default: signs_pass<1, kFirst>(words, cg, nwords, acc); break;
  }
}

void sum_signs(const uint64_t* seeds, const float* coefs, int64_t K, uint32_t stream, uint64_t first_word,
               int64_t nwords, float* acc) {
  if (nwords <= 0) return;
  if (K <= 0) {
    std::memset(acc, 0, sizeof(float) * size_t(32 * nwords));  // +0.0f
    return;
  }
  const uint64_t fb = first_word >> 2;
  const int64_t off = int64_t(first_word & 3u);
  const int64_t nb = (off + nwords + 3) >> 2;
  const int64_t nbv = (nb + kLanes - 1) / kLanes * kLanes;
  alignas(64) uint32_t buf[kSignGroup * kSignBufWords];
  for (int64_t k0 = 0; k0 < K; k0 += kSignGroup) {
    const int G = int(K - k0 < kSignGroup ? K - k0 : kSignGroup);
    for (int g = 0; g < G; ++g) {
      philox_words(key_of(seeds[k0 + g]), stream, spec::COUNTER_RADEMACHER, fb, nbv, buf + g * kSignBufWords);
    }
    if (k0 == 0) signs_group<true>(G, buf + off, coefs, nwords, acc);
    else signs_group<false>(G, buf + off, coefs + k0, nwords, acc);
  }
}
static_assert(kSignGroup >= 1 && kSignGroup <= 8, "sum_signs dispatches groups of 1 .. 8 seeds");

// ------------------------------------------------------------------------------ the final write
// One vector (elements j .. j + kLanes - 1) of dst = round(float32(src) + acc), spec 5.
template <DType D, int R>
KSEED_INLINE void finish_vec(const void* src, void* dst, const float* acc, const uint32_t* r,
                             int64_t j) {
  if constexpr (D == DType::F32) {
    store_f(static_cast<float*>(dst) + j, add(load_f(static_cast<const float*>(src) + j), load_f(acc + j)));
  } else if constexpr (D == DType::BF16) {
    const VF v = add(load_bf16(static_cast<const uint16_t*>(src) + j), load_f(acc + j));
    const VU vb = as_u(v);
    VU res;
    if constexpr (R == kRoundStochastic) {  // spec 5.3, as round_bf16_stochastic
      res = shr<16>(add(vb, shr<16>(load_u(r + j))));
    } else {  // nearest even, as round_bf16_nearest
      const VU odd = and_u(shr<16>(vb), set_u(1));
      res = shr<16>(add(vb, add(odd, set_u(0x7FFFu))));
    }
    store_u16(static_cast<uint16_t*>(dst) + j, select_u(is_nan(v), set_u(0x7FC0u), res));
  } else {
    VF v = add(load_f16(static_cast<const uint16_t*>(src) + j), load_f(acc + j));
    if constexpr (R == kRoundStochastic) {  // spec 5.4, as round_fp16_stochastic_value
      const VU vb = as_u(v);
      const VF a = as_f(and_u(vb, set_u(0x7FFFFFFFu)));
      const VU e = max_i32(sub(and_u(shr<23>(vb), set_u(0xFF)), set_u(127)), set_u(uint32_t(-14)));
      const VF q = as_f(shl<23>(add(e, set_u(127 - 10))));
      const VF inv_q = as_f(shl<23>(sub(set_u(127 + 10), e)));
      const VF y = mul(a, inv_q);
      const VF fl = floor_f(y);
      const VF fr = sub(y, fl);
      const VF u = mul(to_f32(shr<8>(load_u(r + j))), set_f(5.9604644775390625e-08f));  // 2^-24
      const VF res = mul(add(fl, zero_unless(lt_f(u, fr), set_f(1.0f))), q);
      v = as_f(or_u(as_u(res), and_u(vb, set_u(0x80000000u))));
    }
    store_f16(static_cast<uint16_t*>(dst) + j, v);  // nearest even, as round_fp16_nearest
  }
}

template <DType D, int R>
void finish_rows(const void* src, void* dst, const float* acc, const uint32_t* r, int64_t n) {
  const int64_t nv = n - n % kLanes;
  for (int64_t j = 0; j < nv; j += kLanes) finish_vec<D, R>(src, dst, acc, r, j);
  if (nv < n) {  // the last, partial vector, through zero-padded copies (the lanes are independent)
    constexpr size_t es = size_t(dtype_size(D));
    const size_t m = size_t(n - nv);
    alignas(64) unsigned char s[4 * kLanes] = {}, d[4 * kLanes];
    alignas(64) float a[kLanes] = {};
    alignas(64) uint32_t rr[kLanes] = {};
    std::memcpy(s, static_cast<const unsigned char*>(src) + es * size_t(nv), es * m);
    std::memcpy(a, acc + nv, 4 * m);
    if constexpr (R == kRoundStochastic) std::memcpy(rr, r + nv, 4 * m);
    finish_vec<D, R>(s, d, a, rr, 0);
    std::memcpy(static_cast<unsigned char*>(dst) + es * size_t(nv), d, es * m);
  }
}

void finish(DType dtype, const void* src, void* dst, const float* acc, const uint32_t* r, int64_t n,
            int rounding) {
  const bool sr = rounding == kRoundStochastic;
  switch (dtype) {
    case DType::F32: finish_rows<DType::F32, kRoundNearest>(src, dst, acc, r, n); return;
    case DType::BF16:
      if (sr) finish_rows<DType::BF16, kRoundStochastic>(src, dst, acc, r, n);
      else finish_rows<DType::BF16, kRoundNearest>(src, dst, acc, r, n);
      return;
    case DType::F16:
      if (sr) finish_rows<DType::F16, kRoundStochastic>(src, dst, acc, r, n);
      else finish_rows<DType::F16, kRoundNearest>(src, dst, acc, r, n);
      return;
  }
}

// ------------------------------------------------------------------------------ project (spec 9)
// The transpose of the apply: per seed, the block sum of spec section 9.1 over one block of x (float32,
// zero-padded; element j of x is lane j mod 16).  The 16 lanes are kProjAccs vectors of kLanes lanes:
// vector a holds lanes a * kLanes .. a * kLanes + kLanes - 1, and a vector of kLanes consecutive
// elements starting at local index e adds into vector (e / kLanes) mod kProjAccs, so each lane adds its
// products in ascending index.  The fold of the 16 lane sums is the same 15 scalar adds on every path.
static_assert(spec::PROJECT_LANES % kLanes == 0, "the 16 lanes are whole vectors");
constexpr int kProjAccs = spec::PROJECT_LANES / kLanes;
// Philox groups (of kLanes blocks, 4 * kLanes elements) per step of the Gaussian loop: kUnroll, and at
// least 16 elements (the scalar path takes four one-block groups per step).
constexpr int kProjMinStep = 4 * kLanes >= spec::PROJECT_LANES ? 1 : spec::PROJECT_LANES / (4 * kLanes);
constexpr int kProjStep = kUnroll > kProjMinStep ? kUnroll : kProjMinStep;
static_assert(kGroupBlocks % (kLanes * kProjMinStep) == 0, "a SIMD group is whole project steps");

// Spec 9.1 step 3: the fold of the lanes (upper half onto lower half), float32.
KSEED_INLINE float fold_lanes(const VF* acc) {
  alignas(64) float s[spec::PROJECT_LANES];
  for (int a = 0; a < kProjAccs; ++a) store_f(s + a * kLanes, acc[a]);
  for (int h = spec::PROJECT_LANES / 2; h >= 1; h >>= 1) {
    for (int l = 0; l < h; ++l) s[l] = fadd(s[l], s[l + h]);
  }
  return s[0];
}

// acc[(4u + g) mod kProjAccs] += x * z over U groups of blocks from first_block (local block b).
template <int U>
KSEED_INLINE void project_step(const RoundKeys& rk, uint64_t first_block, uint32_t stream,
                               const float* x, VF* acc) {
  VF z[4 * U];
  KSEED_UNROLL
  for (int u = 0; u < U; ++u) normals_group(rk, first_block + uint64_t(u * kLanes), stream, z + 4 * u);
  KSEED_UNROLL
  for (int g = 0; g < 4 * U; ++g) {
    VF& a = acc[g % kProjAccs];
    a = add(a, mul(load_f(x + kLanes * g), z[g]));
  }
}

// The block sum of the Gaussian seed `key` over x[0 .. 4 nblocks) (Philox blocks first_block ..;
// 4 first_block a multiple of 16, nblocks a multiple of kGroupBlocks, x zero past the tensor).
float project_normals(Key key, uint32_t stream, uint64_t first_block, int64_t nblocks, const float* x) {
  const RoundKeys rk = round_keys(key);
  VF acc[kProjAccs];
  for (int a = 0; a < kProjAccs; ++a) acc[a] = set_f(0.0f);
  constexpr int64_t step = int64_t(kProjStep) * kLanes;
  constexpr int64_t min_step = int64_t(kProjMinStep) * kLanes;
  int64_t b = 0;
  for (; b + step <= nblocks; b += step) {
    project_step<kProjStep>(rk, first_block + uint64_t(b), stream, x + 4 * b, acc);
  }
  for (; b < nblocks; b += min_step) {
    project_step<kProjMinStep>(rk, first_block + uint64_t(b), stream, x + 4 * b, acc);
  }
  return fold_lanes(acc);
}

// G seeds' Rademacher block sums over the sign words words[g * kSignBufWords + w], w < nwords, of x
// (32 elements a word): piece q of a word (kLanes elements) adds +-x into lane vector q mod kProjAccs.
template <int G>
KSEED_NOINLINE void project_signs_pass(const uint32_t* words, const float* x, int64_t nwords, float* out) {
  VF acc[G][kProjAccs];
  for (int g = 0; g < G; ++g)
    for (int a = 0; a < kProjAccs; ++a) acc[g][a] = set_f(0.0f);
  for (int64_t w = 0; w < nwords; ++w) {
    VF xv[kSignPieces], nx[kSignPieces];
    KSEED_UNROLL
    for (int q = 0; q < kSignPieces; ++q) {
      xv[q] = load_f(x + 32 * w + kLanes * q);
      nx[q] = as_f(xor_u(as_u(xv[q]), set_u(0x80000000u)));  // -x, exact
    }
    KSEED_UNROLL
    for (int g = 0; g < G; ++g) {
      const SW s = sign_word(words + g * kSignBufWords + w);
      KSEED_UNROLL
      for (int q = 0; q < kSignPieces; ++q) {
        VF& a = acc[g][q % kProjAccs];
        a = add(a, select_sign(xv[q], nx[q], s, q));
      }
    }
  }
  for (int g = 0; g < G; ++g) out[g] = fold_lanes(acc[g]);
}

// out[k] = the Rademacher block sum of seeds[k] over x[0 .. 32 nwords) (sign words first_word ..,
// first_word a multiple of 4: whole Philox blocks; nwords <= kMaxSignWords - 1).
void project_signs(const uint64_t* seeds, int64_t K, uint32_t stream, uint64_t first_word, int64_t nwords,
                   const float* x, float* out) {
  if (nwords <= 0) {
    for (int64_t k = 0; k < K; ++k) out[k] = 0.0f;
    return;
  }
  const uint64_t fb = first_word >> 2;
  const int64_t nbv = ((nwords + 3) / 4 + kLanes - 1) / kLanes * kLanes;
  alignas(64) uint32_t buf[kSignGroup * kSignBufWords];
  for (int64_t k0 = 0; k0 < K; k0 += kSignGroup) {
    const int G = int(K - k0 < kSignGroup ? K - k0 : kSignGroup);
    for (int g = 0; g < G; ++g) {
      philox_words(key_of(seeds[k0 + g]), stream, spec::COUNTER_RADEMACHER, fb, nbv, buf + g * kSignBufWords);
    }
    switch (G) {  // 1 <= G <= kSignGroup <= 8
      case 8: if constexpr (kSignGroup >= 8) project_signs_pass<8>(buf, x, nwords, out + k0); break;
      case 7: if constexpr (kSignGroup >= 7) project_signs_pass<7>(buf, x, nwords, out + k0); break;
      case 6: if constexpr (kSignGroup >= 6) project_signs_pass<6>(buf, x, nwords, out + k0); break;
      case 5: if constexpr (kSignGroup >= 5) project_signs_pass<5>(buf, x, nwords, out + k0); break;
      case 4: if constexpr (kSignGroup >= 4) project_signs_pass<4>(buf, x, nwords, out + k0); break;
      case 3: if constexpr (kSignGroup >= 3) project_signs_pass<3>(buf, x, nwords, out + k0); break;
      case 2: if constexpr (kSignGroup >= 2) project_signs_pass<2>(buf, x, nwords, out + k0); break;
      default: project_signs_pass<1>(buf, x, nwords, out + k0); break;
    }
  }
}

// dst[j] = float32(src[j]) for j < n (exact), src of `dtype`.
void widen(DType dtype, const void* src, float* dst, int64_t n) {
  const int64_t nv = n - n % kLanes;
  int64_t j = 0;
  switch (dtype) {
    case DType::F32:
      std::memcpy(dst, src, sizeof(float) * size_t(n));
      return;
    case DType::BF16:
      for (; j < nv; j += kLanes) store_f(dst + j, load_bf16(static_cast<const uint16_t*>(src) + j));
      for (; j < n; ++j) dst[j] = bf16_bits_to_float(static_cast<const uint16_t*>(src)[j]);
      return;
    case DType::F16:
      for (; j < nv; j += kLanes) store_f(dst + j, load_f16(static_cast<const uint16_t*>(src) + j));
      for (; j < n; ++j) dst[j] = fp16_bits_to_float(static_cast<const uint16_t*>(src)[j]);
      return;
  }
}

// This ISA's row of the dispatch table.
constexpr Kernels make_kernels(bool (*supported)()) {
  return Kernels{supported, &accumulate_normals, &sum_signs, &normals, &philox_words, &finish,
                 &project_normals, &project_signs, &widen};
}
