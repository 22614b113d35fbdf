"""NumPy model of the CUDA flash attention forward (csrc/flash_attn/), lane by lane.

Two independent halves:

* The hardware: ``ldmatrix.m8n8.x4`` (with and without ``.trans``) and ``mma.sync.m16n8k16``
  acting on per-lane registers, written from the PTX ISA's fragment tables ("Matrix fragments
  for mma.m16n8k16 with floating point type", "ldmatrix"); nothing here comes from the kernel.
* The kernel: every per-lane index formula of csrc/flash_attn/fragment_layout.h, mirrored in
  Python (the test compiles the header and checks the mirror equals it), and the kernel's
  steps (tile loads into a shared-memory image with the kernel's buffer offsets and aliasing,
  Q/K/V fragments by ldmatrix, S = Q Kᵀ, base-2 logits with bias and mask, the online softmax
  with quad shuffles, P reused as the A operand, O += P V, the staged 16-byte output stores).

Running the kernel half on the hardware half for a whole problem and comparing with a float64
softmax(Q Kᵀ) V is what catches a layout bug before the kernel ever runs on a GPU. Shared memory
starts as NaN, so reading anything the kernel never wrote poisons the result.

Registers are modelled as arrays indexed [lane, register, half] (half 0 = the low 16 bits =
the first element of the pair); fp32 accumulators as [lane, element].
"""

from __future__ import annotations

import math

import numpy as np

LANES = np.arange(32)
G, T = LANES // 4, LANES % 4  # groupID, threadID_in_group

# --------------------------------------------------------------------------------------------
# The hardware, from the PTX ISA (independent of the kernel).
# --------------------------------------------------------------------------------------------


def ptx_a_coords(lane, reg, half):
    """mma.m16n8k16 .f16/.bf16 A fragment: (row, col) of element a_i, i = 2 * reg + half.
    row = groupID for i < 2 or 4 <= i < 6, else groupID + 8;
    col = threadID_in_group * 2 + (i & 1), + 8 for i >= 4."""
    i = 2 * reg + half
    g, t = lane // 4, lane % 4
    row = g + (0 if (i < 2 or 4 <= i < 6) else 8)
    col = t * 2 + (i & 1) + (8 if i >= 4 else 0)
    return row, col


def ptx_b_coords(lane, reg, half):
    """B fragment (16x8): (k, n) of element b_i, i = 2 * reg + half.
    k = threadID_in_group * 2 + (i & 1), + 8 for i >= 2; n = groupID."""
    i = 2 * reg + half
    g, t = lane // 4, lane % 4
    return t * 2 + (i & 1) + (8 if i >= 2 else 0), g


def ptx_c_coords(lane, i):
    """C/D fragment (16x8 fp32): (row, col) of element c_i.
    row = groupID for i < 2, else groupID + 8; col = threadID_in_group * 2 + (i & 1)."""
    g, t = lane // 4, lane % 4
    return g + (8 if i >= 2 else 0), t * 2 + (i & 1)


def _coord_tables():
    a = np.array([[[ptx_a_coords(l, r, h) for h in range(2)] for r in range(4)] for l in range(32)])
    b = np.array([[[ptx_b_coords(l, r, h) for h in range(2)] for r in range(2)] for l in range(32)])
    c = np.array([[ptx_c_coords(l, i) for i in range(4)] for l in range(32)])
    return a, b, c


A_COORDS, B_COORDS, C_COORDS = _coord_tables()


def mma_m16n8k16(a, b, c):
    """d = A @ B + C with A (16x16), B (16x8) and C gathered from the warp's registers.
    a: [32, 4, 2], b: [32, 2, 2], c: [32, 4] -> d: [32, 4] (float64 here: the model checks
    indices, not rounding)."""
    A = np.full((16, 16), np.nan)
    A[A_COORDS[..., 0], A_COORDS[..., 1]] = a
    B = np.full((16, 8), np.nan)
    B[B_COORDS[..., 0], B_COORDS[..., 1]] = b
    C = np.full((16, 8), np.nan)
    C[C_COORDS[..., 0], C_COORDS[..., 1]] = c
    D = A @ B + C
    return D[C_COORDS[..., 0], C_COORDS[..., 1]]


class SharedMemory:
    """A shared-memory image of 16-bit elements (held as float64 values) plus the float
    key-bias area; records the bank-conflict degree of every ldmatrix."""

    def __init__(self, n_elems: int, n_floats: int):
        self.h = np.full(n_elems, np.nan)
        self.f = np.full(n_floats, np.nan)
        self.worst_ldmatrix_conflict = 1

    def ldmatrix_x4(self, addr, trans=False):
        """addr: [32] element offsets. Lanes 8j..8j+7 give rows 0..7 of matrix j (8 elements =
        16 bytes each, 16-byte aligned); register j of each lane gets M_j[g][2t, 2t+1], or with
        .trans M_j[2t][g], M_j[2t+1][g]."""
        addr = np.asarray(addr)
        assert addr.shape == (32,)
        assert (addr % 8 == 0).all(), "ldmatrix row address not 16-byte aligned"
        out = np.empty((32, 4, 2))
        for j in range(4):
            rows = addr[8 * j: 8 * j + 8]
            assert (rows + 8 <= self.h.size).all() and (rows >= 0).all(), "ldmatrix out of range"
            M = np.stack([self.h[r: r + 8] for r in rows])  # [8 rows, 8 cols]
            # 8 rows of 16 bytes: one wavefront when they sit in 8 distinct 16-byte bank groups
            groups = (rows * 2 // 16) % 8
            self.worst_ldmatrix_conflict = max(self.worst_ldmatrix_conflict,
                                               int(np.bincount(groups).max()))
            if trans:
                out[:, j, 0], out[:, j, 1] = M[2 * T, G], M[2 * T + 1, G]
            else:
                out[:, j, 0], out[:, j, 1] = M[G, 2 * T], M[G, 2 * T + 1]
        return out


# --------------------------------------------------------------------------------------------
# The kernel's formulas: a mirror of csrc/flash_attn/fragment_layout.h (checked against the
# compiled header by the test).
# --------------------------------------------------------------------------------------------

K_BLOCK_M = 64
K_BLOCK_N = 64
K_NUM_WARPS = K_BLOCK_M // 16
K_NUM_THREADS = K_NUM_WARPS * 32
K_SMEM_PAD = 8


def smem_pitch(d):
    return d + K_SMEM_PAD


def ldsm_a_row(lane):
    return (lane & 7) + ((lane >> 3) & 1) * 8


def ldsm_a_col(lane):
    return (lane >> 4) * 8


def ldsm_b_row(lane):
    return (lane & 7) + (lane >> 4) * 8


def ldsm_b_col(lane):
    return ((lane >> 3) & 1) * 8


def acc_row(lane, e):
    return (lane >> 2) + (e >> 1) * 8


def acc_col(lane, e):
    return (lane & 3) * 2 + (e & 1)


def p_tile(kk, r):
    return 2 * kk + (r >> 1)


def p_elem(r, half):
    return (r & 1) * 2 + half


def load_threads_per_row(d):
    return 4 if d // 8 <= 4 else 8 if d // 8 <= 8 else 16 if d // 8 <= 16 else 32


def load_rows_per_step(d):
    return K_NUM_THREADS // load_threads_per_row(d)


def load_steps(d):
    return K_BLOCK_N // load_rows_per_step(d)


def load_row(tid, step, d):
    return tid // load_threads_per_row(d) + step * load_rows_per_step(d)


def load_col(tid, d):
    return (tid % load_threads_per_row(d)) * 8


def load_active(tid, d):
    return load_col(tid, d) < d


def masked(i, j, n_keys, causal):
    return j >= n_keys or (causal and j > i)


def formula_table(head_dims=(32, 64, 80, 96, 128)):
    """Every formula's value over its whole domain, in the format the C++ dumper prints."""
    t = {
        "kBlockM": K_BLOCK_M, "kBlockN": K_BLOCK_N, "kNumWarps": K_NUM_WARPS,
        "kNumThreads": K_NUM_THREADS,
        "ldsm_a_row": [ldsm_a_row(l) for l in range(32)],
        "ldsm_a_col": [ldsm_a_col(l) for l in range(32)],
        "ldsm_b_row": [ldsm_b_row(l) for l in range(32)],
        "ldsm_b_col": [ldsm_b_col(l) for l in range(32)],
        "acc_row": [[acc_row(l, e) for e in range(4)] for l in range(32)],
        "acc_col": [[acc_col(l, e) for e in range(4)] for l in range(32)],
        "p_tile": [[p_tile(kk, r) for r in range(4)] for kk in range(K_BLOCK_N // 16)],
        "p_elem": [[p_elem(r, h) for h in range(2)] for r in range(4)],
        "masked": [[[[int(masked(i, j, n, c)) for c in (0, 1)] for n in range(1, 6)]
                    for j in range(6)] for i in range(6)],
    }
    for d in head_dims:
        t[f"smem_pitch_{d}"] = smem_pitch(d)
        t[f"load_steps_{d}"] = load_steps(d)
        t[f"load_row_{d}"] = [[load_row(tid, s, d) for s in range(load_steps(d))]
                              for tid in range(K_NUM_THREADS)]
        t[f"load_col_{d}"] = [load_col(tid, d) for tid in range(K_NUM_THREADS)]
        t[f"load_active_{d}"] = [int(load_active(tid, d)) for tid in range(K_NUM_THREADS)]
    return t


# The same table from the compiled header (the test writes this program, compiles it with the
# host C++ compiler and parses its output with json).
CPP_DUMPER = r"""
#include <cstdio>
#include "flash_attn/fragment_layout.h"
using namespace xray_ops::flash;
static void list(const char* name, int n, int (*f)(int)) {
  std::printf("\"%s\": [", name);
  for (int i = 0; i < n; ++i) std::printf("%s%d", i ? ", " : "", f(i));
  std::printf("],\n");
}
int main() {
  const int dims[] = {32, 64, 80, 96, 128};
  std::printf("{\"kBlockM\": %d, \"kBlockN\": %d, \"kNumWarps\": %d, \"kNumThreads\": %d,\n",
              kBlockM, kBlockN, kNumWarps, kNumThreads);
  list("ldsm_a_row", 32, [](int l) { return ldsm_a_row(l); });
  list("ldsm_a_col", 32, [](int l) { return ldsm_a_col(l); });
  list("ldsm_b_row", 32, [](int l) { return ldsm_b_row(l); });
  list("ldsm_b_col", 32, [](int l) { return ldsm_b_col(l); });
  std::printf("\"acc_row\": [");
  for (int l = 0; l < 32; ++l)
    std::printf("%s[%d, %d, %d, %d]", l ? ", " : "", acc_row(l, 0), acc_row(l, 1),
                acc_row(l, 2), acc_row(l, 3));
  std::printf("],\n\"acc_col\": [");
  for (int l = 0; l < 32; ++l)
    std::printf("%s[%d, %d, %d, %d]", l ? ", " : "", acc_col(l, 0), acc_col(l, 1),
                acc_col(l, 2), acc_col(l, 3));
  std::printf("],\n\"p_tile\": [");
  for (int kk = 0; kk < kBlockN / 16; ++kk)
    std::printf("%s[%d, %d, %d, %d]", kk ? ", " : "", p_tile(kk, 0), p_tile(kk, 1),
                p_tile(kk, 2), p_tile(kk, 3));
  std::printf("],\n\"p_elem\": [");
  for (int r = 0; r < 4; ++r)
    std::printf("%s[%d, %d]", r ? ", " : "", p_elem(r, 0), p_elem(r, 1));
  std::printf("],\n\"masked\": [");
  for (int i = 0; i < 6; ++i) {
    std::printf("%s[", i ? ", " : "");
    for (int j = 0; j < 6; ++j) {
      std::printf("%s[", j ? ", " : "");
      for (int n = 1; n < 6; ++n)
        std::printf("%s[%d, %d]", n > 1 ? ", " : "", int(masked(i, j, n, false)),
                    int(masked(i, j, n, true)));
      std::printf("]");
    }
    std::printf("]");
  }
  std::printf("]");
  for (int d : dims) {
    std::printf(",\n\"smem_pitch_%d\": %d, \"load_steps_%d\": %d", d, smem_pitch(d), d,
                load_steps(d));
    std::printf(",\n\"load_row_%d\": [", d);
    for (int tid = 0; tid < kNumThreads; ++tid) {
      std::printf("%s[", tid ? ", " : "");
      for (int s = 0; s < load_steps(d); ++s)
        std::printf("%s%d", s ? ", " : "", load_row(tid, s, d));
      std::printf("]");
    }
    std::printf("],\n\"load_col_%d\": [", d);
    for (int tid = 0; tid < kNumThreads; ++tid)
      std::printf("%s%d", tid ? ", " : "", load_col(tid, d));
    std::printf("],\n\"load_active_%d\": [", d);
    for (int tid = 0; tid < kNumThreads; ++tid)
      std::printf("%s%d", tid ? ", " : "", int(load_active(tid, d)));
    std::printf("]");
  }
  std::printf("}\n");
  return 0;
}
"""

# --------------------------------------------------------------------------------------------
# The kernel's steps, one CTA at a time (flash_fwd_kernel.cuh, in the same order).
# --------------------------------------------------------------------------------------------

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def _load_tile(smem, base, G_rows, row_start, rows_valid, d):
    """load_tile for all 128 threads: tile rows row_start.. of G_rows ([N, d]) into the image
    at element offset `base`; rows >= rows_valid zero-filled (cp.async src-size 0)."""
    P = smem_pitch(d)
    for tid in range(K_NUM_THREADS):
        if not load_active(tid, d):
            continue
        col = load_col(tid, d)
        for i in range(load_steps(d)):
            row = load_row(tid, i, d)
            dst = base + row * P + col
            smem.h[dst: dst + 8] = (G_rows[row_start + row, col: col + 8]
                                    if row < rows_valid else 0.0)


def _load_kv(smem, buf_k, buf_v, buf_b, K, V, bias, nb, d):
    n_start = nb * K_BLOCK_N
    rows = K.shape[0] - n_start
    _load_tile(smem, buf_k, K, n_start, rows, d)
    _load_tile(smem, buf_v, V, n_start, rows, d)
    if bias is not None:
        for tid in range(K_BLOCK_N):
            smem.f[buf_b + tid] = bias[n_start + tid] if tid < rows else 0.0


def _shfl_xor(x, m):
    return x[LANES ^ m]


def emulate_cta(Q, K, V, bias, scale, causal, m_block, round_p=lambda x: x, smem=None):
    """One CTA of the kernel: queries m_block * 64 .. +63 of one (batch, head).

    Q: [Nq, d], K, V: [Nk, d] (values already in the element type), bias: [Nk] or None.
    round_p: the cast of P to the element type before P V (identity: exact index check).
    Returns (out [rows, d], lse [rows]) for the block's rows that exist, and the smem image.
    """
    n_q, d = Q.shape
    n_k = K.shape[0]
    P = smem_pitch(d)
    tile = K_BLOCK_N * P
    if smem is None:
        smem = SharedMemory(4 * tile, 2 * K_BLOCK_N)
    sQ, sO = 2 * tile, 0
    m_start = m_block * K_BLOCK_M
    n_end = min(n_k, m_start + K_BLOCK_M) if causal else n_k
    n_blocks = (n_end + K_BLOCK_N - 1) // K_BLOCK_N
    scale_log2 = scale * LOG2E

    # 1. Q and block 0; Q to registers; block 1 over Q's buffer
    _load_tile(smem, sQ, Q, m_start, n_q - m_start, d)
    _load_kv(smem, 0, tile, 0, K, V, bias, 0, d)
    qf = [[smem.ldmatrix_x4(sQ + (w * 16 + ldsm_a_row(LANES)) * P + kk * 16 + ldsm_a_col(LANES))
           for kk in range(d // 16)] for w in range(K_NUM_WARPS)]
    if n_blocks > 1:
        _load_kv(smem, 2 * tile, 3 * tile, K_BLOCK_N, K, V, bias, 1, d)

    o = np.zeros((K_NUM_WARPS, d // 8, 32, 4))
    m_run = np.full((K_NUM_WARPS, 32, 2), -np.inf)
    l_run = np.zeros((K_NUM_WARPS, 32, 2))

    for nb in range(n_blocks):
        buf = nb & 1
        Ks, Vs, Bs = buf * 2 * tile, buf * 2 * tile + tile, buf * K_BLOCK_N
        n_start = nb * K_BLOCK_N
        need_mask = n_start + K_BLOCK_N > n_k or (causal and n_start + K_BLOCK_N - 1 > m_start)
        for w in range(K_NUM_WARPS):
            s = np.zeros((K_BLOCK_N // 8, 32, 4))
            for kk in range(d // 16):
                for jp in range(K_BLOCK_N // 16):
                    kb = smem.ldmatrix_x4(Ks + (jp * 16 + ldsm_b_row(LANES)) * P + kk * 16
                                          + ldsm_b_col(LANES))
                    s[2 * jp] = mma_m16n8k16(qf[w][kk], kb[:, 0:2], s[2 * jp])
                    s[2 * jp + 1] = mma_m16n8k16(qf[w][kk], kb[:, 2:4], s[2 * jp + 1])
            for jt in range(K_BLOCK_N // 8):
                for e in range(4):
                    b2 = (smem.f[Bs + jt * 8 + acc_col(LANES, e)] * LOG2E
                          if bias is not None else 0.0)
                    x = s[jt][:, e] * scale_log2 + b2
                    if need_mask:
                        i = m_start + w * 16 + acc_row(LANES, e)
                        j = n_start + jt * 8 + acc_col(LANES, e)
                        mk = np.array([masked(a, b, n_k, causal) for a, b in zip(i, j)])
                        x = np.where(mk, -np.inf, x)
                    s[jt][:, e] = x
            for r in range(2):
                mx = m_run[w][:, r].copy()
                for jt in range(K_BLOCK_N // 8):
                    mx = np.fmax(mx, np.fmax(s[jt][:, 2 * r], s[jt][:, 2 * r + 1]))
                mx = np.fmax(mx, _shfl_xor(mx, 1))
                mx = np.fmax(mx, _shfl_xor(mx, 2))
                m_use = np.where(mx == -np.inf, 0.0, mx)
                alpha = np.exp2(m_run[w][:, r] - m_use)
                m_run[w][:, r] = mx
                total = np.zeros(32)
                for jt in range(K_BLOCK_N // 8):
                    for c in range(2):
                        pv = np.exp2(s[jt][:, 2 * r + c] - m_use)
                        s[jt][:, 2 * r + c] = pv
                        total += pv
                l_run[w][:, r] = l_run[w][:, r] * alpha + total
                o[w][:, :, 2 * r] *= alpha
                o[w][:, :, 2 * r + 1] *= alpha
            for kk in range(K_BLOCK_N // 16):
                pa = np.empty((32, 4, 2))
                for r in range(4):
                    for h in range(2):
                        pa[:, r, h] = round_p(s[p_tile(kk, r)][:, p_elem(r, h)])
                for dp in range(d // 16):
                    vb = smem.ldmatrix_x4(Vs + (kk * 16 + ldsm_a_row(LANES)) * P + dp * 16
                                          + ldsm_a_col(LANES), trans=True)
                    o[w][2 * dp] = mma_m16n8k16(pa, vb[:, 0:2], o[w][2 * dp])
                    o[w][2 * dp + 1] = mma_m16n8k16(pa, vb[:, 2:4], o[w][2 * dp + 1])
        if nb + 2 < n_blocks:
            _load_kv(smem, Ks, Vs, Bs, K, V, bias, nb + 2, d)

    # 3. normalise, lse, stage, store
    rows = min(K_BLOCK_M, n_q - m_start)
    out = np.full((rows, d), np.nan)
    lse = np.full(rows, np.nan)
    for w in range(K_NUM_WARPS):
        inv_l = np.empty((32, 2))
        for r in range(2):
            l = l_run[w][:, r].copy()
            l = l + _shfl_xor(l, 1)
            l = l + _shfl_xor(l, 2)
            safe_l = np.where(l == 0, 1.0, l)
            inv_l[:, r] = np.where(l == 0, 0.0, 1.0 / safe_l)
            val = np.where(l == 0, -np.inf, (m_run[w][:, r] + np.log2(safe_l)) * LN2)
            i = w * 16 + acc_row(LANES, 2 * r)
            for lane in range(0, 32, 4):
                if i[lane] < rows:
                    lse[i[lane]] = val[lane]
        for dt in range(d // 8):
            for r in range(2):
                row = w * 16 + acc_row(LANES, 2 * r)
                col = dt * 8 + acc_col(LANES, 2 * r)
                smem.h[sO + row * P + col] = o[w][dt][:, 2 * r] * inv_l[:, r]
                smem.h[sO + row * P + col + 1] = o[w][dt][:, 2 * r + 1] * inv_l[:, r]
        cpr = d // 8
        for lane in range(32):
            for c in range(lane, 16 * cpr, 32):
                row, col = w * 16 + c // cpr, (c % cpr) * 8
                if row < rows:
                    out[row, col: col + 8] = smem.h[sO + row * P + col: sO + row * P + col + 8]
    return out, lse, smem


def emulate_attention(Q, K, V, bias, scale, causal, round_p=lambda x: x):
    """The whole grid for one (batch, head): every query block. Returns out, lse and the worst
    ldmatrix bank-conflict degree seen."""
    n_q = Q.shape[0]
    outs, lses, worst = [], [], 1
    for mb in range(math.ceil(n_q / K_BLOCK_M)):
        o, l, sm = emulate_cta(Q, K, V, bias, scale, causal, mb, round_p)
        outs.append(o)
        lses.append(l)
        worst = max(worst, sm.worst_ldmatrix_conflict)
    return np.concatenate(outs), np.concatenate(lses), worst


def reference_attention(Q, K, V, bias, scale, causal):
    """float64 softmax(scale Q Kᵀ + bias, masked) V and the natural-log lse."""
    n_q, n_k = Q.shape[0], K.shape[0]
    S = scale * Q @ K.T
    if bias is not None:
        S = S + bias[None, :]
    if causal:
        S = np.where(np.tril(np.ones((n_q, n_k), dtype=bool)), S, -np.inf)
    m = S.max(axis=1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    E = np.exp(S - m)
    lsum = E.sum(axis=1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.where(lsum > 0, (E @ V) / np.where(lsum > 0, lsum, 1), 0.0)
        lse = np.where(lsum[:, 0] > 0, np.log(np.where(lsum[:, 0] > 0, lsum[:, 0], 1)) + m[:, 0],
                       -np.inf)
    return out, lse
