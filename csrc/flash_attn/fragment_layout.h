// Tile shapes and every per-lane index formula of the flash attention forward kernel.
//
// Plain C++ (no CUDA headers) on purpose: the kernel calls these functions, and the CPU test
// tests/test_flash_attention_cuda_emulation.py compiles this header with the host compiler,
// dumps every formula's value for every lane, and checks that they are the formulas its NumPy
// model of ldmatrix / mma.sync (written from the PTX ISA's fragment tables) reproduces
// softmax(Q Kᵀ) V with. A layout bug shows there, before any GPU run.
//
// ---------------------------------------------------------------------------------------------
// Fragment layouts relied on (PTX ISA, "Matrix fragments for mma.m16n8k16" with .f16/.bf16,
// and "ldmatrix"). lane = 0..31, g = lane / 4 ("groupID"), t = lane % 4 ("threadID_in_group").
// A 32-bit register holds two 16-bit elements; the lower half is the first (lower column/row).
//
//   mma A (16x16, row-major, 4 regs):  reg 0 = A[g    ][2t, 2t+1]   reg 1 = A[g + 8][2t, 2t+1]
//                                       reg 2 = A[g    ][2t+8, 2t+9] reg 3 = A[g + 8][2t+8, 2t+9]
//   mma B (16x8 "col", 2 regs):         reg 0 = B[2t, 2t+1  ][g]     reg 1 = B[2t+8, 2t+9][g]
//   mma C/D (16x8 fp32, 4 regs):        c0, c1 = C[g][2t, 2t+1]      c2, c3 = C[g + 8][2t, 2t+1]
//
//   ldmatrix.m8n8.x4.b16: lanes 8j..8j+7 give the addresses of rows 0..7 of matrix j (16 bytes
//   each); register j of every lane receives matrix j: M_j[g][2t, 2t+1]. With .trans it
//   receives M_j[2t][g], M_j[2t+1][g] (the matrix transposed).
//
// How the kernel uses them (a warp owns 16 query rows; shared tiles are row-major, one token
// per row, head dim along the row, pitch D + 8 elements):
//   Q  (A of S = Q Kᵀ, k = head dim): ldmatrix x4 with lane address row ldsm_a_row(lane),
//      column ldsm_a_col(lane) inside a 16x16 block: matrices = (rows 0-7, cols 0-7),
//      (rows 8-15, cols 0-7), (rows 0-7, cols 8-15), (rows 8-15, cols 8-15) = A regs 0..3.
//   K  (B of S = Q Kᵀ: B[k][n] = K[n][k], n = key): ldmatrix x4 (no .trans) at key row
//      ldsm_b_row(lane), column ldsm_b_col(lane): matrices = (keys 0-7, dims 0-7),
//      (keys 0-7, dims 8-15), (keys 8-15, dims 0-7), (keys 8-15, dims 8-15): regs 0,1 are the
//      B fragment of key tile 0 (keys 0-7), regs 2,3 that of key tile 1 (keys 8-15).
//   V  (B of O = P V: B[k][n] = V[k][n], k = key, n = head dim): ldmatrix x4 .trans at key row
//      ldsm_a_row(lane), column ldsm_a_col(lane) (the Q addressing): matrices = (keys 0-7,
//      dims 0-7), (keys 8-15, dims 0-7), (keys 0-7, dims 8-15), (keys 8-15, dims 8-15), each
//      transposed by .trans: regs 0,1 = B fragment of dim tile 0, regs 2,3 of dim tile 1.
//   P  (A of O = P V): the C fragments of S are already in A layout, no shuffle: A reg r of key
//      step kk (keys 16kk..16kk+15) packs S tile p_tile(kk, r), elements p_elem(r, 0..1).
//   Row statistics: lane holds rows g (elements 0,1) and g + 8 (elements 2,3) of each C
//      fragment; the 4 lanes of a quad (same g) hold one row: reduce with shfl_xor 1 and 2.
// ---------------------------------------------------------------------------------------------
#pragma once

#if defined(__CUDACC__)
#define XO_FA_HD __host__ __device__ __forceinline__
#else
#define XO_FA_HD inline
#endif

namespace xray_ops {
namespace flash {

constexpr int kBlockM = 64;              // queries per CTA: 4 warps x 16 rows
constexpr int kBlockN = 64;              // keys per K/V tile
constexpr int kNumWarps = kBlockM / 16;  // each warp owns 16 query rows
constexpr int kNumThreads = kNumWarps * 32;
constexpr int kSmemPad = 8;  // elements added to each shared row: 16 bytes, see smem_pitch

// Shared-memory row pitch in elements. (D + 8) * 2 bytes = 16 * (D/8 + 1): for D a multiple
// of 16, D/8 + 1 is odd, so the 8 row addresses of one ldmatrix matrix fall on 8 different
// 16-byte bank groups (no bank conflicts), and every row start stays 16-byte aligned.
XO_FA_HD constexpr int smem_pitch(int d) { return d + kSmemPad; }

// ldmatrix x4 lane address inside a 16x16 block, "A order" (Q and the V .trans loads):
// matrix j = lane / 8 covers rows 8 * (j % 2) .. +7 and columns 8 * (j / 2) .. +7.
XO_FA_HD constexpr int ldsm_a_row(int lane) { return (lane & 7) + ((lane >> 3) & 1) * 8; }
XO_FA_HD constexpr int ldsm_a_col(int lane) { return (lane >> 4) * 8; }

// ldmatrix x4 lane address inside a 16(keys)x16(dims) block of K, "B order":
// matrix j covers keys 8 * (j / 2) .. +7 and dims 8 * (j % 2) .. +7.
XO_FA_HD constexpr int ldsm_b_row(int lane) { return (lane & 7) + (lane >> 4) * 8; }
XO_FA_HD constexpr int ldsm_b_col(int lane) { return ((lane >> 3) & 1) * 8; }

// Row and column inside a 16x8 C/D tile of accumulator element e (0..3) of a lane.
XO_FA_HD constexpr int acc_row(int lane, int e) { return (lane >> 2) + (e >> 1) * 8; }
XO_FA_HD constexpr int acc_col(int lane, int e) { return (lane & 3) * 2 + (e & 1); }

// P as the A operand of P V: register r (0..3) of key step kk packs S accumulator tile
// p_tile(kk, r) (8 keys each), elements p_elem(r, 0) (low half) and p_elem(r, 1) (high half).
XO_FA_HD constexpr int p_tile(int kk, int r) { return 2 * kk + (r >> 1); }
XO_FA_HD constexpr int p_elem(int r, int half) { return (r & 1) * 2 + half; }

// Tile loads (kBlockN rows x D columns, 16-byte chunks of 8 elements): the threads form rows
// of load_threads_per_row(D) (D / 8 rounded up to a power of two; the extra threads of a row
// idle for D = 80, 96), so that thread tid's chunk in step i is row
// tid / tpr + i * load_rows_per_step(D), column 8 * (tid % tpr): its addresses advance by a
// constant each step, which keeps the address registers down.
XO_FA_HD constexpr int load_threads_per_row(int d) {
  return d / 8 <= 4 ? 4 : d / 8 <= 8 ? 8 : d / 8 <= 16 ? 16 : 32;
}
XO_FA_HD constexpr int load_rows_per_step(int d) { return kNumThreads / load_threads_per_row(d); }
XO_FA_HD constexpr int load_steps(int d) { return kBlockN / load_rows_per_step(d); }
XO_FA_HD constexpr int load_row(int tid, int step, int d) {
  return tid / load_threads_per_row(d) + step * load_rows_per_step(d);
}
XO_FA_HD constexpr int load_col(int tid, int d) { return (tid % load_threads_per_row(d)) * 8; }
XO_FA_HD constexpr bool load_active(int tid, int d) { return load_col(tid, d) < d; }

// Is the logit of query i and key j masked out (ragged key tile, or causal top-left: query i
// sees keys 0..i)?
XO_FA_HD constexpr bool masked(int i, int j, int n_keys, bool causal) {
  return j >= n_keys || (causal && j > i);
}

static_assert(kBlockM == kBlockN, "Q shares a K/V tile buffer; the output is staged in one");
static_assert(kBlockN % load_rows_per_step(128) == 0 && kBlockN % load_rows_per_step(32) == 0,
              "the load steps cover a tile exactly");
static_assert(kBlockN % 16 == 0, "key tiles are consumed in k-steps of 16");

}  // namespace flash
}  // namespace xray_ops
