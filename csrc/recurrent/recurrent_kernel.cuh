// Generic fused recurrent kernels (forward and backward); see recurrent.h for the math.
//
// Thread block = one (sequence, value head, tile of 32 value columns). Lane c of every
// warp owns column c of the tile; warp w owns the R = KMAX / W consecutive state rows
// w*R .. w*R + R-1, kept in registers: every state load/store of a warp is one coalesced
// 128-byte row segment, and a thread's slice of a staged K-vector is contiguous, so it
// is read with 16-byte shared-memory loads. Per step the K-vectors (q, k, a, b,
// exp(gk)) are staged in shared memory (one element per thread); reductions over K
// (S^T q, S^T k, a^T S ...) are per-thread FMA chains, then a fixed-order sum across
// warps in shared memory: deterministic.
//
// (16-bit inputs at K = 64 / 128 without key gates or low-rank terms take the warp walk of
// recurrent_warp_walk.cuh forward instead: one warp per 8 value columns, sums by shuffles.)
//
// Backward: the forward saves S every kRecurrentCkpt steps. The backward walks the
// segments from last to first: it replays a segment from its checkpoint, parking the
// pre-step states in a per-block scratch buffer, then steps backwards through it with
// dS in registers. Gradients of K-vectors are reduced over the block's 32 columns through
// each warp's shared buffer (row_sums) and written as per-value-tile partials that the
// host sums in a fixed order (no atomics).
#pragma once
#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "common/device.cuh"
#include "common/cuda_check.h"
#include "recurrent/recurrent.h"

namespace fla {
namespace recurrent {

constexpr int BV = kRecurrentBV;
constexpr int CKPT = kRecurrentCkpt;
constexpr int kDecodeStages = 3;  // decode kernel: tiles in flight + 1

template <int KMAX>
struct Layout {
  // 16 rows per thread up to K = 128 keeps the forward at <= 64 registers, so 1024 threads
  // per SM are resident: many state loads in flight and little tail in the decode step.
  static constexpr int kWarps = KMAX <= 64 ? 4 : 8;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kFwdMinBlocks = KMAX <= 128 ? 1024 / kThreads : 2;
  // The decode kernel holds two tiles' inputs: 3/4 of the blocks, <= 80 registers (at 64 it
  // spilled 76 bytes; at 80, 16-52). Two tiles in flight per block keep 96 KB per SM in flight.
  static constexpr int kDecodeMinBlocks = kFwdMinBlocks * 3 / 4;
  // The backward at K = 128: two blocks per SM (<= 128 registers).
  static constexpr int kBwdMinBlocks = KMAX == 128 ? 2 : 1;
  static constexpr int kRows = KMAX / kWarps;  // state rows per thread: warp * kRows + i
  static_assert(kRows == 16 || kRows == 32, "row_sums handles 16 or 32 rows per thread");
  static_assert(KMAX <= kThreads, "one staged K-vector element per thread");
};

// Slots of the per-step K-vectors in shared memory.
enum Vec { kQ = 0, kK = 1, kA = 2, kB = 3, kAlpha = 4, kNumVec = 5 };

struct SeqInfo {
  int64_t bos;  // first token of the sequence in the packed [B*T] axis
  int len;
  int64_t ckpt_base;  // first checkpoint slot of the sequence
};

__device__ __forceinline__ SeqInfo seq_info(const RecurrentParams& p, int n) {
  SeqInfo s;
  if (p.cu_seqlens) {
    s.bos = p.cu_seqlens[n];
    s.len = static_cast<int>(p.cu_seqlens[n + 1] - s.bos);
  } else {
    s.bos = static_cast<int64_t>(n) * p.T;
    s.len = p.T;
  }
  // ceil(len / CKPT) slots per sequence fit between consecutive bases (see recurrent.h).
  s.ckpt_base = s.bos / CKPT + n;
  return s;
}

// Which (sequence, head, tile) this block owns.
struct BlockCoord {
  int n, hv, h, hg, vt, col;
  bool col_ok;
  int64_t blk;
};

// Division of 32-bit numbers below 2^31 by a divisor fixed at launch: a multiply-high, an
// add and a shift (Granlund and Montgomery), with the magic number computed on the host.
struct FastDiv {
  uint32_t d = 1, mul = 0, shift = 0;
  FastDiv() = default;
  explicit FastDiv(uint32_t divisor) : d(divisor) {
    while ((uint64_t{1} << shift) < d) ++shift;
    mul = static_cast<uint32_t>(((uint64_t{1} << 32) * ((uint64_t{1} << shift) - d)) / d + 1);
  }
  __device__ __forceinline__ uint32_t operator()(uint32_t n) const { return (__umulhi(n, mul) + n) >> shift; }
};

// The divisors of a tile index: value tiles per head, value heads, value heads per key head.
struct TileDivs {
  FastDiv nv, hv, group;
};

// `cols`: value columns a tile (BV here, the warp walk's 8).
inline TileDivs tile_divs(const RecurrentParams& p, int cols = BV) {
  return TileDivs{FastDiv(static_cast<uint32_t>((p.V + cols - 1) / cols)), FastDiv(static_cast<uint32_t>(p.HV)),
                  FastDiv(static_cast<uint32_t>(p.HV / p.H))};
}

// 32-bit index arithmetic: a tile index is below 2^31 (the launchers check). The persistent
// decode kernel takes this for every tile, where a division was ~20 instructions (a 64-bit one
// a subroutine call): it passes `divs`; the walk kernels, once a block, divide.
__device__ __forceinline__ BlockCoord block_coord(const RecurrentParams& p, uint32_t tile, const TileDivs* divs = nullptr) {
  BlockCoord c;
  const uint32_t NV = static_cast<uint32_t>(recurrent_value_tiles(p.V)), HV = static_cast<uint32_t>(p.HV);
  const uint32_t nh = divs ? divs->nv(tile) : tile / NV;
  c.blk = tile;
  c.vt = static_cast<int>(tile - nh * NV);
  c.n = static_cast<int>(divs ? divs->hv(nh) : nh / HV);
  c.hv = static_cast<int>(nh - static_cast<uint32_t>(c.n) * HV);
  c.h = static_cast<int>(divs ? divs->group(static_cast<uint32_t>(c.hv)) : static_cast<uint32_t>(c.hv / (p.HV / p.H)));
  c.hg = p.gk_heads == p.HV ? c.hv : c.h;
  c.col = c.vt * BV + (threadIdx.x & 31);
  c.col_ok = c.col < p.V;
  return c;
}

// An element of the input dtype as loaded: its bits, widened to fp32 when the step uses it.
template <typename T> struct RawElem { using type = unsigned short; };
template <> struct RawElem<float> { using type = float; };
template <typename T> __device__ __forceinline__ float widen(typename RawElem<T>::type x);
template <> __device__ __forceinline__ float widen<float>(float x) { return x; }
template <> __device__ __forceinline__ float widen<__nv_bfloat16>(unsigned short x) {
  return __uint_as_float(static_cast<uint32_t>(x) << 16);  // to_float's value; its SASS (not measured) differs
}
template <> __device__ __forceinline__ float widen<__half>(unsigned short x) { return to_float(__ushort_as_half(x)); }

// Everything one step reads: element threadIdx.x of the K-vectors (staged to shared
// memory for all threads) and the per-column scalars of this thread's column.
struct StepInputs {
  float q, k, a, b, alpha;
  float v, dout, gamma, beta;

  template <int KMAX>
  __device__ __forceinline__ void stage(float (*vec)[KMAX]) const {
    const int e = threadIdx.x;
    if (e < KMAX) {
      vec[kQ][e] = q;
      vec[kK][e] = k;
      vec[kA][e] = a;
      vec[kB][e] = b;
      vec[kAlpha][e] = alpha;
    }
  }
};

// StepInputs as loaded, before any arithmetic on them. The forward walk holds these a
// step ahead and the decode kernel two tiles ahead: a conversion or exp at load time made
// the thread wait there for the load (and ptxas spilled the values, whose stores wait too),
// so `convert` does that work when the step runs.
template <typename T>
struct RawStepInputs {
  using E = typename RawElem<T>::type;
  E q, k, a, b, v, dout;
  float log_alpha, log_gamma, log_gv;
  uint32_t beta_bits;  // fp32 bits when p.beta_fp32, else the input dtype's

  __device__ __forceinline__ void load(const RecurrentParams& p, const BlockCoord& c, int64_t t, bool with_dout) {
    const int e = threadIdx.x;
    const bool e_ok = e < p.K;
    const int64_t qk = (t * p.H + c.h) * p.K + e;
    const E zero = E(0);
    q = e_ok ? static_cast<const E*>(p.q)[qk] : zero;
    k = e_ok ? static_cast<const E*>(p.k)[qk] : zero;
    a = (p.a && e_ok) ? static_cast<const E*>(p.a)[qk] : zero;
    b = (p.b && e_ok) ? static_cast<const E*>(p.b)[qk] : zero;
    log_alpha = (p.gk && e_ok) ? p.gk[(t * p.gk_heads + c.hg) * p.K + e] : 0.f;
    const int64_t tv = (t * p.HV + c.hv) * p.V + c.col;
    v = c.col_ok ? static_cast<const E*>(p.v)[tv] : zero;
    dout = (with_dout && c.col_ok) ? static_cast<const E*>(p.dout)[tv] : zero;
    log_gamma = p.g ? p.g[t * p.HV + c.hv] : 0.f;
    log_gv = (p.gv && c.col_ok) ? p.gv[tv] : 0.f;
    beta_bits = 0u;
    if (p.delta) {
      const int64_t bi = p.beta_per_v ? tv : t * p.HV + c.hv;
      if (!p.beta_per_v || c.col_ok) {
        if (sizeof(E) == 4 || p.beta_fp32)
          beta_bits = __float_as_uint(static_cast<const float*>(p.beta)[bi]);
        else
          beta_bits = static_cast<const unsigned short*>(p.beta)[bi];
      }
    }
  }

  __device__ __forceinline__ StepInputs convert(const RecurrentParams& p) const {
    StepInputs in;
    // With in-kernel l2norm the scale is applied after normalising (normalize_qk).
    in.q = widen<T>(q) * (p.l2norm_qk ? 1.f : p.scale);
    in.k = widen<T>(k);
    in.a = widen<T>(a);
    in.b = widen<T>(b);
    in.alpha = p.gk ? __expf(log_alpha) : 1.f;
    in.v = widen<T>(v);
    in.dout = widen<T>(dout);
    in.gamma = p.g ? __expf(log_gamma) : 1.f;
    if (p.gv) in.gamma *= __expf(log_gv);
    in.beta = 1.f;
    if (p.delta) {
      if constexpr (sizeof(E) == 4)
        in.beta = __uint_as_float(beta_bits);
      else
        in.beta = p.beta_fp32 ? __uint_as_float(beta_bits) : widen<T>(static_cast<E>(beta_bits));
    }
    return in;
  }
};

// Sum over all rows of the state (all threads of a column): per-thread partials summed
// across warps in a fixed order. `slot` must not be reused before the next step's sync.
template <int W>
__device__ __forceinline__ float column_sum(float partial, float (*slot)[BV]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  slot[warp][lane] = partial;
  __syncthreads();
  float s = 0.f;
#pragma unroll
  for (int w = 0; w < W; ++w) s += slot[w][lane];
  return s;
}

// Row sums through shared memory: a warp's [32 columns][kRowPad] buffer, each column's 16
// rows padded to 20 floats so that both the 16-byte stores and the reads below are free of
// bank conflicts.
constexpr int kRowPad = 20;

// Sum over the 32 columns of a warp for each of this thread's R rows; lane l ends with the
// sum of row l % R. Each lane stores its column, 16 rows at a time, with four 16-byte
// stores; lanes l and l + 16 add up half the columns of row l % 16 each (the upper half
// starting 4 columns on, which puts the two halves in disjoint banks), and one shuffle
// joins them. A fixed order of additions: deterministic. (The butterfly reduce-scatter
// this replaced, 31 shuffles and twice as many selects, held 35% of the backward's
// instructions under ncu.)
template <int R>
__device__ __forceinline__ float row_sums(const float (&x)[R], float (*buf)[kRowPad]) {
  const int lane = threadIdx.x & 31, half = lane >> 4, row = lane & 15;
  float result = 0.f;
#pragma unroll
  for (int pass = 0; pass < R / 16; ++pass) {
    float4* mine = reinterpret_cast<float4*>(buf[lane]);
#pragma unroll
    for (int i = 0; i < 4; ++i)
      mine[i] = make_float4(x[16 * pass + 4 * i], x[16 * pass + 4 * i + 1], x[16 * pass + 4 * i + 2], x[16 * pass + 4 * i + 3]);
    __syncwarp();
    float sum = 0.f;
#pragma unroll
    for (int i = 0; i < 16; ++i) sum += buf[16 * half + ((i + 4 * half) & 15)][row];
    sum += __shfl_xor_sync(0xffffffffu, sum, 16);
    __syncwarp();  // the buffer is rewritten by the next pass or call
    if (R == 16 || pass == half) result = sum;  // R = 32: lane l keeps row l
  }
  return result;
}

// Row sums of one K-vector gradient over this block's 32 columns -> its per-value-tile
// partial dst[vt][t][hv][row] (summed over tiles on the host, in a fixed order).
template <int R, int W>
__device__ __forceinline__ void write_rows(float* dst, const float (&x)[R], float (*buf)[kRowPad], int64_t t,
                                           const RecurrentParams& p, const BlockCoord& c, int64_t BT) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const float sum = row_sums<R>(x, buf);
  const int r = warp * R + lane % R;
  if (lane < R && r < p.K) dst[((c.vt * BT + t) * p.HV + c.hv) * p.K + r] = sum;
}

// In-kernel l2norm of the staged q and k (FLA's use_qk_l2norm_in_kernel): block sums of
// squares, then each thread rescales its own element. Costs two barriers, only when on.
template <int KMAX, int W>
__device__ __forceinline__ void normalize_qk(const RecurrentParams& p, float (*vec)[KMAX], float (*slot)[BV]) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, e = threadIdx.x;
  const float q = e < KMAX ? vec[kQ][e] : 0.f, k = e < KMAX ? vec[kK][e] : 0.f;
  const float sq = warp_sum(q * q), sk = warp_sum(k * k);
  if (lane == 0) {
    slot[warp][0] = sq;
    slot[warp][1] = sk;
  }
  __syncthreads();
  float tq = 0.f, tk = 0.f;
#pragma unroll
  for (int w = 0; w < W; ++w) {
    tq += slot[w][0];
    tk += slot[w][1];
  }
  if (e < KMAX) {
    vec[kQ][e] = q * (p.scale * rsqrtf(tq + 1e-6f));
    vec[kK][e] = k * rsqrtf(tk + 1e-6f);
  }
  __syncthreads();
}

// One step on this thread's state registers: S_{t-1} -> S_t. Returns w = a^T S_{t-1},
// u = s2^T k and v' (the value written into the state), which the backward reuses.
// Uses reduction slots red[0] (w) and red[1] (u).
struct StepState {
  float w, u, vp;
};

// This thread's R consecutive rows of a staged K-vector, with 16-byte shared loads.
template <int R>
__device__ __forceinline__ void load_rows(const float* first, float (&x)[R]) {
  const float4* src = reinterpret_cast<const float4*>(first);
#pragma unroll
  for (int i = 0; i < R / 4; ++i) {
    const float4 t = src[i];
    x[4 * i] = t.x;
    x[4 * i + 1] = t.y;
    x[4 * i + 2] = t.z;
    x[4 * i + 3] = t.w;
  }
}

template <int KMAX>
__device__ __forceinline__ StepState forward_step(const RecurrentParams& p, float (&s)[Layout<KMAX>::kRows],
                                                  const float (*vec)[KMAX], const StepInputs& in,
                                                  float (*red)[Layout<KMAX>::kWarps][BV]) {
  using L = Layout<KMAX>;
  constexpr int R = L::kRows, W = L::kWarps;
  const int row0 = (threadIdx.x >> 5) * R;
  StepState st{0.f, 0.f, in.v};
  float x[R];
  if (p.a) {
    load_rows<R>(&vec[kA][row0], x);
    float part = 0.f;
#pragma unroll
    for (int i = 0; i < R; ++i) part += x[i] * s[i];
    st.w = column_sum<W>(part, red[0]);
  }
  if (p.gk) {
    load_rows<R>(&vec[kAlpha][row0], x);
#pragma unroll
    for (int i = 0; i < R; ++i) s[i] *= in.gamma * x[i];
  } else {
#pragma unroll
    for (int i = 0; i < R; ++i) s[i] *= in.gamma;
  }
  if (p.a) {
    load_rows<R>(&vec[kB][row0], x);
#pragma unroll
    for (int i = 0; i < R; ++i) s[i] += x[i] * st.w;
  }
  load_rows<R>(&vec[kK][row0], x);
  if (p.delta) {
    float part = 0.f;
#pragma unroll
    for (int i = 0; i < R; ++i) part += x[i] * s[i];
    st.u = column_sum<W>(part, red[1]);
    st.vp = in.beta * (in.v - st.u);
  }
#pragma unroll
  for (int i = 0; i < R; ++i) s[i] += x[i] * st.vp;
  return st;
}

template <typename T, int KMAX>
__device__ __forceinline__ void load_state(const float* src, float (&s)[Layout<KMAX>::kRows], const RecurrentParams& p,
                                           const BlockCoord& c) {
  using L = Layout<KMAX>;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int i = 0; i < L::kRows; ++i) {
    const int r = warp * L::kRows + i;
    s[i] = (src && r < p.K && c.col_ok) ? src[static_cast<int64_t>(r) * p.V + c.col] : 0.f;
  }
}

template <int KMAX>
__device__ __forceinline__ void store_state(float* dst, const float (&s)[Layout<KMAX>::kRows], const RecurrentParams& p,
                                            const BlockCoord& c) {
  using L = Layout<KMAX>;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int i = 0; i < L::kRows; ++i) {
    const int r = warp * L::kRows + i;
    if (r < p.K && c.col_ok) dst[static_cast<int64_t>(r) * p.V + c.col] = s[i];
  }
}

__device__ __forceinline__ int64_t time_index(const RecurrentParams& p, const SeqInfo& sq, int i) {
  return sq.bos + (p.reverse ? sq.len - 1 - i : i);
}

// ---------------------------------------------------------------------------------------
template <typename T, int KMAX>
__global__ void __launch_bounds__(Layout<KMAX>::kThreads, Layout<KMAX>::kFwdMinBlocks) recurrent_fwd_kernel(const RecurrentParams p) {
  using L = Layout<KMAX>;
  constexpr int R = L::kRows, W = L::kWarps;
  __shared__ __align__(16) float s_vec[2][kNumVec][KMAX];  // double-buffered by step parity
  __shared__ float s_red[4][W][BV];  // 0 w, 1 u (forward_step), 2 o, 3 l2norm

  const BlockCoord c = block_coord(p, blockIdx.x);
  const SeqInfo sq = seq_info(p, c.n);
  const int64_t state_off = (static_cast<int64_t>(c.n) * p.HV + c.hv) * p.K * p.V;
  const int64_t slot_stride = static_cast<int64_t>(p.HV) * p.K * p.V;
  const int64_t head_off = static_cast<int64_t>(c.hv) * p.K * p.V;
  const int warp = threadIdx.x >> 5;

  float s[R];
  load_state<T, KMAX>(p.h0 ? p.h0 + state_off : nullptr, s, p, c);

  RawStepInputs<T> next;
  if (sq.len > 0) next.load(p, c, time_index(p, sq, 0), false);
  for (int i = 0; i < sq.len; ++i) {
    const int64_t t = time_index(p, sq, i);
    if (p.checkpoints && i % CKPT == 0)
      store_state<KMAX>(p.checkpoints + (sq.ckpt_base + i / CKPT) * slot_stride + head_off, s, p, c);
    const StepInputs cur = next.convert(p);
    float (*vec)[KMAX] = s_vec[i & 1];
    cur.stage<KMAX>(vec);
    __syncthreads();
    if (i + 1 < sq.len) next.load(p, c, time_index(p, sq, i + 1), false);  // in flight during this step
    if (p.l2norm_qk) normalize_qk<KMAX, W>(p, vec, s_red[3]);

    forward_step<KMAX>(p, s, vec, cur, s_red);
    float qv[R];
    load_rows<R>(&vec[kQ][warp * R], qv);
    float part = 0.f;
#pragma unroll
    for (int i2 = 0; i2 < R; ++i2) part += qv[i2] * s[i2];
    const float o = column_sum<W>(part, s_red[2]);
    if (warp == 0 && c.col_ok) static_cast<T*>(p.o)[(t * p.HV + c.hv) * p.V + c.col] = from_float<T>(o);
  }
  if (p.ht) store_state<KMAX>(p.ht + state_off, s, p, c);
  if (p.checkpoints) {
    // Zero this sequence's spare slots (up to the next sequence's first) so the output
    // holds no uninitialised memory.
    const int64_t end = c.n + 1 < p.N ? seq_info(p, c.n + 1).ckpt_base : p.ckpt_slots;
    for (int i = 0; i < R; ++i) s[i] = 0.f;
    for (int64_t slot = sq.ckpt_base + (sq.len + CKPT - 1) / CKPT; slot < end; ++slot)
      store_state<KMAX>(p.checkpoints + slot * slot_stride + head_off, s, p, c);
  }
}

// ---------------------------------------------------------------------------------------
// Decode step: every sequence is one token (dense T == 1, no checkpoints). In the walk
// kernel above a block's life is then load -> compute -> store, and while it computes it
// has nothing in flight: with 4 resident blocks per SM it took 0.054-0.070 ms (1.2-1.6x the
// memory floor, H100), the families with more compute per step the slowest.
// Here persistent blocks loop over tiles with a 3-stage pipeline: the initial state of the
// tile two ahead is copied into shared memory (cp.async) and its inputs, unconverted, into
// one of two register sets while the current tile computes, so each load has two tiles'
// time to land. (One set loaded a tile ahead measured 42.4 us for simple GLA, the kernel
// that converted at load time 39.8, this one 37.5.)

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Tile `c`'s [KMAX, BV] slice of h0 -> dst, 16 bytes per copy (the host checks V % 4 == 0
// and a 16-byte aligned h0). Rows / columns past K / V are zero-filled.
template <int KMAX>
__device__ __forceinline__ void prefetch_state(const RecurrentParams& p, const BlockCoord& c, float (*dst)[BV]) {
  constexpr int kPieces = KMAX * BV / 4, kThreads = Layout<KMAX>::kThreads;
  static_assert(kPieces % kThreads == 0, "whole copies per thread");
  const float* src = p.h0 + (static_cast<int64_t>(c.n) * p.HV + c.hv) * p.K * p.V;
#pragma unroll
  for (int i = 0; i < kPieces / kThreads; ++i) {
    const int j = threadIdx.x + i * kThreads;
    const int r = j / (BV / 4), c4 = (j % (BV / 4)) * 4;
    const int col = c.vt * BV + c4;
    const bool ok = r < p.K && col < p.V;
    cp_async_16(&dst[r][c4], ok ? src + static_cast<int64_t>(r) * p.V + col : src, ok);
  }
}

template <typename T, int KMAX>
__global__ void __launch_bounds__(Layout<KMAX>::kThreads, Layout<KMAX>::kDecodeMinBlocks) recurrent_decode_kernel(const RecurrentParams p, const TileDivs divs) {
  using L = Layout<KMAX>;
  constexpr int R = L::kRows, W = L::kWarps;
  extern __shared__ __align__(16) float s_states[];  // [kDecodeStages][KMAX][BV] initial states
  __shared__ __align__(16) float s_vec[kNumVec][KMAX];
  __shared__ float s_red[4][W][BV];  // 0 w, 1 u (forward_step), 2 o, 3 l2norm

  const uint32_t tiles = static_cast<uint32_t>(p.N) * p.HV * recurrent_value_tiles(p.V);
  const uint32_t G = gridDim.x;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  auto state_buf = [&](uint32_t i) { return reinterpret_cast<float (*)[BV]>(s_states + (i % kDecodeStages) * KMAX * BV); };
  // Issue tile i's loads (this block's i-th tile): inputs into `in`, h0 into its stage.
  auto issue = [&](uint32_t i, RawStepInputs<T>& in) {
    const uint32_t tile = blockIdx.x + i * G;
    if (tile < tiles) {
      const BlockCoord c = block_coord(p, tile, &divs);
      in.load(p, c, c.n, false);  // T == 1: sequence n's token is row n
      if (p.h0) prefetch_state<KMAX>(p, c, state_buf(i));
    }
    cp_async_commit();  // (empty past the end: the wait below counts groups)
  };
  // Tile i, whose loads were issued two tiles ago; then issue tile i + 2 into `in`.
  auto step = [&](uint32_t i, RawStepInputs<T>& in) {
    const BlockCoord c = block_coord(p, blockIdx.x + i * G, &divs);
    cp_async_wait<1>();  // all but tile i + 1's group: tile i's state has landed
    const StepInputs cur = in.convert(p);
    cur.stage<KMAX>(s_vec);
    issue(i + 2, in);  // into the stage tile i - 1 used (free since its last barrier)
    __syncthreads();   // staged vectors and every thread's copies visible
    float s[R];
    const float (*h0)[BV] = state_buf(i);
#pragma unroll
    for (int r = 0; r < R; ++r) s[r] = p.h0 ? h0[warp * R + r][lane] : 0.f;
    if (p.l2norm_qk) normalize_qk<KMAX, W>(p, s_vec, s_red[3]);

    forward_step<KMAX>(p, s, s_vec, cur, s_red);
    float qv[R];
    load_rows<R>(&s_vec[kQ][warp * R], qv);
    float part = 0.f;
#pragma unroll
    for (int r = 0; r < R; ++r) part += qv[r] * s[r];
    const float o = column_sum<W>(part, s_red[2]);
    if (warp == 0 && c.col_ok) static_cast<T*>(p.o)[(static_cast<int64_t>(c.n) * p.HV + c.hv) * p.V + c.col] = from_float<T>(o);
    if (p.ht) store_state<KMAX>(p.ht + (static_cast<int64_t>(c.n) * p.HV + c.hv) * p.K * p.V, s, p, c);
    __syncthreads();  // s_vec, s_red and this stage are rewritten by the next tiles
  };

  RawStepInputs<T> in0, in1;  // inputs of even / odd tiles
  issue(0, in0);
  issue(1, in1);
  for (uint32_t i = 0; blockIdx.x + i * G < tiles; i += 2) {
    step(i, in0);
    if (blockIdx.x + (i + 1) * G < tiles) step(i + 1, in1);
  }
  cp_async_wait<0>();
}

// ---------------------------------------------------------------------------------------
template <typename T, int KMAX>
__global__ void __launch_bounds__(Layout<KMAX>::kThreads, Layout<KMAX>::kBwdMinBlocks) recurrent_bwd_kernel(const RecurrentParams p) {
  using L = Layout<KMAX>;
  constexpr int R = L::kRows, W = L::kWarps;
  __shared__ __align__(16) float s_vec[2][kNumVec][KMAX];
  __shared__ float s_red[6][W][BV];  // 0 w, 1 u (forward_step), 2 dv', 3 dw, 4 gate, 5 l2norm
  __shared__ __align__(16) float s_rows[W][32][kRowPad];  // each warp's row-sum buffer

  const BlockCoord c = block_coord(p, blockIdx.x);
  const SeqInfo sq = seq_info(p, c.n);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  const int64_t state_off = (static_cast<int64_t>(c.n) * p.HV + c.hv) * p.K * p.V;
  const int64_t slot_stride = static_cast<int64_t>(p.HV) * p.K * p.V;
  const int64_t head_off = static_cast<int64_t>(c.hv) * p.K * p.V;
  const int64_t BT = static_cast<int64_t>(p.B) * p.T;
  // This block's parking space for the pre-step states of one segment: [CKPT][KMAX][BV].
  float* scratch = p.scratch + c.blk * (static_cast<int64_t>(CKPT) * KMAX * BV);

  float ds[R];
  load_state<T, KMAX>(p.dht ? p.dht + state_off : nullptr, ds, p, c);

  int parity = 0;
  const int nseg = (sq.len + CKPT - 1) / CKPT;
  // Every step's inputs are loaded (as loaded, see RawStepInputs) one step ahead, across the
  // replays and backward walks: the replay's first step, ..., its last, the backward walk's
  // first, ..., its last, the previous segment's replay's first. dO comes with every step
  // (the replay does not use it; one more element a thread, and no step is loaded twice).
  RawStepInputs<T> next;
  if (nseg > 0) next.load(p, c, time_index(p, sq, (nseg - 1) * CKPT), true);
  for (int seg = nseg - 1; seg >= 0; --seg) {
    const int i0 = seg * CKPT, i1 = min(sq.len, i0 + CKPT);
    float s[R];
    load_state<T, KMAX>(p.checkpoints + (sq.ckpt_base + seg) * slot_stride + head_off, s, p, c);
    // Replay the segment up to its last step, parking each pre-step state (each thread
    // re-reads only its own elements, so no barrier is needed between the park and the later
    // read). The last step's pre-step state stays in s: the walk starts from it.
    for (int i = i0; i + 1 < i1; ++i) {
      float* park = scratch + static_cast<int64_t>(i - i0) * KMAX * BV;
#pragma unroll
      for (int j = 0; j < R; ++j) park[(warp * R + j) * BV + lane] = s[j];
      const StepInputs in = next.convert(p);
      next.load(p, c, time_index(p, sq, i + 1), true);
      float (*vec)[KMAX] = s_vec[parity];
      parity ^= 1;
      in.stage<KMAX>(vec);
      __syncthreads();
      if (p.l2norm_qk) normalize_qk<KMAX, W>(p, vec, s_red[5]);
      forward_step<KMAX>(p, s, vec, in, s_red);
    }
    // Walk the segment backwards.
    for (int i = i1 - 1; i >= i0; --i) {
      const int64_t t = time_index(p, sq, i);
      const float* park = scratch + static_cast<int64_t>(i - i0) * KMAX * BV;
      float sp[R];  // S_{t-1}, the state before this step: the last step's in the replay's registers
#pragma unroll
      for (int j = 0; j < R; ++j) sp[j] = i + 1 == i1 ? s[j] : park[(warp * R + j) * BV + lane];
      const StepInputs in = next.convert(p);
      if (i > i0)
        next.load(p, c, time_index(p, sq, i - 1), true);
      else if (seg > 0)
        next.load(p, c, time_index(p, sq, (seg - 1) * CKPT), true);
      float (*vec)[KMAX] = s_vec[parity];
      parity ^= 1;
      in.stage<KMAX>(vec);
      __syncthreads();
      if (p.l2norm_qk) normalize_qk<KMAX, W>(p, vec, s_red[5]);

      // Recompute the step for w, u, v'; then s2 = the state after decay and low-rank
      // term (S_t = s2 + k v'^T), with the same arithmetic as forward_step.
      float s2[R];
#pragma unroll
      for (int j = 0; j < R; ++j) s2[j] = sp[j];
      const StepState st = forward_step<KMAX>(p, s2, vec, in, s_red);
#pragma unroll
      for (int j = 0; j < R; ++j) {
        const int r = warp * R + j;
        s2[j] = sp[j] * (in.gamma * vec[kAlpha][r]);
        if (p.a) s2[j] += vec[kB][r] * st.w;
      }

      // dS_t += (scale q) do^T ; dq = S_t do (scale folded into q's staging and reapplied here)
      float x[R];
#pragma unroll
      for (int j = 0; j < R; ++j) {
        const int r = warp * R + j;
        ds[j] += vec[kQ][r] * in.dout;
        x[j] = (s2[j] + vec[kK][r] * st.vp) * in.dout * p.scale;
      }
      write_rows<R, W>(p.dq_part, x, s_rows[warp], t, p, c, BT);

      // v' was written as k v'^T: dk += dS v', dv' = dS^T k
      float part = 0.f;
#pragma unroll
      for (int j = 0; j < R; ++j) {
        const int r = warp * R + j;
        part += vec[kK][r] * ds[j];
        x[j] = ds[j] * st.vp;
      }
      const float dvp = column_sum<W>(part, s_red[2]);
      const int64_t tv = (t * p.HV + c.hv) * p.V + c.col;
      if (p.delta) {
        // v' = beta (v - u), u = s2^T k
        const float du = -in.beta * dvp;
        if (warp == 0 && c.col_ok) p.dv[tv] = in.beta * dvp;
        const float dbeta = (in.v - st.u) * dvp;
        if (p.beta_per_v) {
          if (warp == 0 && c.col_ok) p.dbeta[tv] = dbeta;
        } else {
          const float tile = warp_sum(c.col_ok ? dbeta : 0.f);
          if (threadIdx.x == 0) p.dbeta[(c.vt * BT + t) * p.HV + c.hv] = tile;
        }
#pragma unroll
        for (int j = 0; j < R; ++j) {
          x[j] += s2[j] * du;
          ds[j] += vec[kK][warp * R + j] * du;  // ds now = grad wrt s2
        }
      } else if (warp == 0 && c.col_ok) {
        p.dv[tv] = dvp;
      }
      write_rows<R, W>(p.dk_part, x, s_rows[warp], t, p, c, BT);

      float dw = 0.f;
      if (p.a) {
        // s2 = s' + b w^T, w = a^T S_{t-1}
        part = 0.f;
#pragma unroll
        for (int j = 0; j < R; ++j) {
          part += vec[kB][warp * R + j] * ds[j];
          x[j] = ds[j] * st.w;
        }
        write_rows<R, W>(p.db_part, x, s_rows[warp], t, p, c, BT);
        dw = column_sum<W>(part, s_red[3]);
#pragma unroll
        for (int j = 0; j < R; ++j) x[j] = sp[j] * dw;
        write_rows<R, W>(p.da_part, x, s_rows[warp], t, p, c, BT);
      }

      if (p.g || p.gk || p.gv) {
        // s' = gamma alpha S_{t-1}: d(log gate) = <dS', s'> summed over what the gate scales.
        part = 0.f;
#pragma unroll
        for (int j = 0; j < R; ++j) {
          const float e = ds[j] * sp[j] * in.gamma * vec[kAlpha][warp * R + j];
          x[j] = e;
          part += e;
        }
        if (p.gk) write_rows<R, W>(p.dgk_part, x, s_rows[warp], t, p, c, BT);
        if (p.g || p.gv) {
          const float col_sum = column_sum<W>(part, s_red[4]);
          if (p.gv && warp == 0 && c.col_ok) p.dgv[tv] = col_sum;
          if (p.g) {
            const float tile = warp_sum(c.col_ok ? col_sum : 0.f);
            if (threadIdx.x == 0) p.dg_part[(c.vt * BT + t) * p.HV + c.hv] = tile;
          }
        }
      }
      // dS_{t-1} = gamma alpha dS' + a dw^T
#pragma unroll
      for (int j = 0; j < R; ++j) {
        const int r = warp * R + j;
        ds[j] = ds[j] * in.gamma * vec[kAlpha][r] + (p.a ? vec[kA][r] * dw : 0.f);
      }
    }
  }
  if (p.dh0) store_state<KMAX>(p.dh0 + state_off, ds, p, c);
}

// One block (walk kernels), tile (decode) or warp (warp walk) per (sequence, head, `cols`
// value columns): grid.x and the kernels' 32-bit tile arithmetic hold below 2^31, which this
// checks before returning the count.
inline int64_t checked_tile_count(const RecurrentParams& p, int cols = BV) {
  const int64_t tiles = static_cast<int64_t>(p.N) * p.HV * ((p.V + cols - 1) / cols);
  if (tiles >= (int64_t{1} << 31))
    throw std::invalid_argument("fused_recurrent: batch * heads * ceil(V / " + std::to_string(cols) +
                                ") must be below 2^31");
  return tiles;
}

}  // namespace recurrent
}  // namespace fla

// The forward walk of the families without key gates or low-rank terms at K = 64 / 128 (one
// warp per 8 value columns, no block barriers): launch_recurrent_fwd prefers it.
#include "recurrent/recurrent_warp_walk.cuh"

namespace fla {
namespace recurrent {

template <typename T, int KMAX>
void launch_recurrent_fwd(const RecurrentParams& p, cudaStream_t stream) {
  const int64_t blocks = checked_tile_count(p);
  if (blocks == 0) return;
  if constexpr (KMAX <= 128) {  // (K = 256, three 32 KB stages per block, was not measured)
    const bool decode = p.T == 1 && !p.cu_seqlens && !p.checkpoints && p.V % 4 == 0 &&
                        reinterpret_cast<uintptr_t>(p.h0) % 16 == 0;
    if (decode) {
      const auto kernel = recurrent_decode_kernel<T, KMAX>;
      constexpr int smem = kDecodeStages * KMAX * BV * sizeof(float);
      // Once per device and instantiation: the shared-memory attribute, then every resident
      // block as the grid (fewer measured slower: 342 and 264 blocks against 396).
      static int64_t resident[64] = {};
      int dev = 0;
      FLA_CUDA_CHECK(cudaGetDevice(&dev));
      int64_t grid_cap = dev >= 0 && dev < 64 ? resident[dev] : 0;
      if (grid_cap == 0) {
        FLA_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
        int per_sm = 0;
        FLA_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, Layout<KMAX>::kThreads, smem));
        grid_cap = static_cast<int64_t>(sm_count(dev)) * std::max(per_sm, 1);
        if (dev >= 0 && dev < 64) resident[dev] = grid_cap;
      }
      const int64_t grid = std::min(blocks, grid_cap);
      kernel<<<static_cast<unsigned>(grid), Layout<KMAX>::kThreads, smem, stream>>>(p, tile_divs(p));
      FLA_CHECK_LAUNCH();
      return;
    }
  }
  if constexpr (warp_walk::kHas<T, KMAX>) {
    if (warp_walk::takes(p, KMAX)) {
      warp_walk::launch<T, KMAX>(p, stream);
      return;
    }
  }
  recurrent_fwd_kernel<T, KMAX><<<static_cast<unsigned>(blocks), Layout<KMAX>::kThreads, 0, stream>>>(p);
  FLA_CHECK_LAUNCH();
}

template <typename T, int KMAX>
void launch_recurrent_bwd(const RecurrentParams& p, cudaStream_t stream) {
  const int64_t blocks = checked_tile_count(p);
  if (blocks == 0) return;
  recurrent_bwd_kernel<T, KMAX><<<static_cast<unsigned>(blocks), Layout<KMAX>::kThreads, 0, stream>>>(p);
  FLA_CHECK_LAUNCH();
}

}  // namespace recurrent

template <typename T, int KMAX>
void run_recurrent_fwd(const RecurrentParams& p, cudaStream_t stream) {
  recurrent::launch_recurrent_fwd<T, KMAX>(p, stream);
}

template <typename T, int KMAX>
void run_recurrent_bwd(const RecurrentParams& p, cudaStream_t stream) {
  recurrent::launch_recurrent_bwd<T, KMAX>(p, stream);
}

}  // namespace fla
