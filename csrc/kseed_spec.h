// The constants of the kseed noise spec (docs/SPEC.md), as exact float32 bit patterns.
// kseed_kernels/_spec.py holds the same values for Python; tests/test_spec_constants.py checks them.
#pragma once
#include <cstdint>

namespace kseed {
namespace spec {

constexpr uint32_t PHILOX_M0 = 0xD2511F53u;
constexpr uint32_t PHILOX_M1 = 0xCD9E8D57u;
constexpr uint32_t PHILOX_W0 = 0x9E3779B9u;
constexpr uint32_t PHILOX_W1 = 0xBB67AE85u;
constexpr int PHILOX_ROUNDS = 10;

constexpr uint32_t COUNTER_GAUSSIAN = 0;
constexpr uint32_t COUNTER_STOCHASTIC_ROUNDING = 1;
constexpr uint32_t COUNTER_RADEMACHER = 2;  // spec section 8: 128 sign bits a block

// project_seeds (spec section 9): blocks of PROJECT_BLOCK elements, PROJECT_LANES float32 lanes each.
constexpr int64_t PROJECT_BLOCK = 2048;
constexpr int PROJECT_LANES = 16;

// Scalars rather than arrays, so that CUDA device code can use them directly.
constexpr uint32_t LOG_C0 = 0x3F800000u, LOG_C1 = 0xBEFFFFFCu, LOG_C2 = 0x3EAAAAA8u,
                   LOG_C3 = 0xBE800214u, LOG_C4 = 0x3E4CD23Bu, LOG_C5 = 0xBE2A13D4u,
                   LOG_C6 = 0x3E11343Au, LOG_C7 = 0xBE079613u, LOG_C8 = 0x3E043DB9u,
                   LOG_C9 = 0xBD9C7039u;
constexpr uint32_t LN2_HI_BITS = 0x3F317180u;
constexpr uint32_t LN2_LO_BITS = 0x3717F7D1u;
constexpr uint32_t SQRT2_MANT = 0x3504F3u;

constexpr uint32_t SIN_C0 = 0x3F490FDBu, SIN_C1 = 0xBDA55DE7u, SIN_C2 = 0x3B2335DDu,
                   SIN_C3 = 0xB819654Fu, SIN_C4 = 0x34A5E43Eu;
constexpr uint32_t COS_C0 = 0x3F800000u, COS_C1 = 0xBE9DE9E6u, COS_C2 = 0x3C81E0EEu,
                   COS_C3 = 0xB9AAE2BDu, COS_C4 = 0x366CE193u;

}  // namespace spec
}  // namespace kseed
