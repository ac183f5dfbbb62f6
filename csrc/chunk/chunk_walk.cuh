// Pieces of the chunk walk (chunk.h) that the SM80 pass (chunk_kernel.cuh) and the wgmma
// pass (chunk_pass_sm90.cuh) share: where a block's positions are, the gates and their
// running sums, the chunk loads, the decays of v and of the scores.
#pragma once
#include <cute/tensor.hpp>

#include <type_traits>

#include "chunk/chunk.h"
#include "common/sequence_slots.cuh"

namespace fla {
namespace chunk {

constexpr float kLog2e = 1.4426950408889634f;

// 2^x in one MUFU instruction (denormal results flush to zero: decays below 1e-38). The
// gates' running sums are kept in log2 units for it: __expf adds a multiply, and a range
// check and rescale for denormals.
__device__ __forceinline__ float exp2_ftz(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

template <typename Elem>
__device__ __forceinline__ void cp_async_16(Elem* smem, const Elem* gmem, bool valid) {
  using V = cute::uint128_t;
  cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<V>::copy(*reinterpret_cast<const V*>(gmem), *reinterpret_cast<V*>(smem),
                                                 valid);
}

__device__ __forceinline__ void cp_async_4(float* smem, const float* gmem, bool valid) {
  cute::SM80_CP_ASYNC_CACHEALWAYS_ZFILL<uint32_t>::copy(*reinterpret_cast<const uint32_t*>(gmem),
                                                        *reinterpret_cast<uint32_t*>(smem), valid);
}

// A block's positions: sequence n is rows [bos, bos + len) of the [B*T, H, D] inputs; segment
// seg of a split walk covers processing positions [seg_begin, seg_begin + seg_len).
struct WalkSpan {
  int64_t bos, len, seg_begin, seg_len;
  int num_chunks;
};

__device__ __forceinline__ WalkSpan walk_span(const ChunkParams& p, int n, int seg) {
  WalkSpan s;
  s.bos = int64_t(n) * p.T;
  s.len = p.T;
  if (p.cu_seqlens != nullptr) {
    s.bos = p.cu_seqlens[n];
    s.len = p.cu_seqlens[n + 1] - s.bos;
  }
  s.seg_begin = int64_t(seg) * p.seg_chunks * kChunk;
  s.seg_len = p.num_segs == 1 ? s.len : min(s.len - s.seg_begin, int64_t(p.seg_chunks) * kChunk);
  s.num_chunks = s.seg_len > 0 ? int((s.seg_len + kChunk - 1) / kChunk) : 0;
  return s;
}

// The slot of a walk's first chunk in per-chunk tensors (GLA's key decays and states, the
// normaliser's carries): its sequence's first slot (sequence_slots) plus the chunks before
// its segment. seg_begin: WalkSpan's.
__device__ __forceinline__ int64_t walk_first_slot(const ChunkParams& p, int n, int64_t seg_begin) {
  int64_t c0, c1;
  sequence_slots<kChunk>(n, p.cu_seqlens, p.chunk_offsets, p.T, c0, c1);
  return c0 + seg_begin / kChunk;
}

// The raw log gate of head h at token t (per step, per head, or none).
__device__ __forceinline__ float raw_gate_at_token(const ChunkParams& p, int h, int64_t t) {
  return p.g != nullptr ? p.g[t * p.H + h] : (p.g_gamma != nullptr ? p.g_gamma[h] : 0.f);
}

// Whether a gate applies to the state before processing position pos of the walk (see chunk.h
// for the reverse shift), and the token it is read at.
__device__ __forceinline__ bool gate_token(const ChunkParams& p, const WalkSpan& s, int64_t pos, int64_t& t) {
  t = p.reverse ? s.bos + s.len - pos : s.bos + pos;
  return pos < s.len && !(p.reverse && pos == 0);
}

// The raw log gate applied to the state before processing position pos, not yet clamped: the
// clamp waits for the load, so it comes with the scan.
__device__ __forceinline__ float raw_gate_at(const ChunkParams& p, int h, const WalkSpan& s, int64_t pos) {
  int64_t t;
  return gate_token(p, s, pos, t) ? raw_gate_at_token(p, h, t) : 0.f;
}

// Lane `lane`'s raw gates of chunk c of the block's walk: positions 2 lane and 2 lane + 1.
__device__ __forceinline__ void fetch_gate_pair(const ChunkParams& p, int h, const WalkSpan& s, int c, int lane,
                                                float& raw0, float& raw1) {
  const int64_t pos = s.seg_begin + int64_t(c) * kChunk + 2 * lane;
  raw0 = raw_gate_at(p, h, s, pos);
  raw1 = raw_gate_at(p, h, s, pos + 1);
}

// One warp's running sums of a chunk's clamped gates in log2 units: lane l holds the raw
// gates of positions 2l and 2l + 1; out gets the kChunk cumulative gates.
__device__ __forceinline__ void scan_gate_pairs(float raw0, float raw1, int lane, float* out) {
  raw0 = fmaxf(raw0, kMinLogGate) * kLog2e;
  raw1 = fmaxf(raw1, kMinLogGate) * kLog2e;
  const float pair = raw0 + raw1;
  float incl = pair;
  CUTE_UNROLL
  for (int d = 1; d < 32; d *= 2) {
    const float up = __shfl_up_sync(0xffffffffu, incl, d);
    if (lane >= d) incl += up;
  }
  out[2 * lane] = incl - pair + raw0;
  out[2 * lane + 1] = incl;
}

// One thread's 16-byte vectors of a chunk by cp.async: rows r0 + j kRows (j < kChunk / kRows)
// at shared offsets soff[j], global rows `step` elements apart from base + off. Rows past
// rows_left are zero-filled (their source is the tensor's first row, never read); whole
// chunks skip the guards (a select and a predicate per vector).
template <int kRows, typename Elem>
__device__ __forceinline__ void copy_chunk_rows(Elem* s, const int* soff, const Elem* base, int64_t off, int64_t step,
                                                int r0, int rows_left) {
  if (rows_left >= kChunk) {
    CUTE_UNROLL
    for (int j = 0; j < kChunk / kRows; ++j) cp_async_16(s + soff[j], base + off + j * step, true);
  } else {
    CUTE_UNROLL
    for (int j = 0; j < kChunk / kRows; ++j) {
      const bool valid = r0 + j * kRows < rows_left;
      cp_async_16(s + soff[j], base + (valid ? off + j * step : 0), valid);
    }
  }
}

// V scaled by its decay to the chunk end, for the state update: one thread's 16-byte vectors
// of rows r0 + j kRows, dst = src * 2^(G_last - G_row) * scale (G cumulative, log2 units).
template <int kRows, typename Elem>
__device__ __forceinline__ void scale_rows_to_chunk_end(const Elem* src, Elem* dst, const int* soff, const float* G,
                                                        int r0, float scale) {
  const float g_last = G[kChunk - 1];
  CUTE_UNROLL
  for (int j = 0; j < kChunk / kRows; ++j) {
    const float w = exp2_ftz(g_last - G[r0 + j * kRows]) * scale;
    cute::array<Elem, 8> x;
    *reinterpret_cast<cute::uint128_t*>(x.data()) = *reinterpret_cast<const cute::uint128_t*>(src + soff[j]);
    CUTE_UNROLL
    for (int e = 0; e < 8; ++e) x[e] = static_cast<Elem>(static_cast<float>(x[e]) * w);
    *reinterpret_cast<cute::uint128_t*>(dst + soff[j]) = *reinterpret_cast<const cute::uint128_t*>(x.data());
  }
}

// No term added to the scores (decay_mask_scores).
struct NoScoreTerm {};

// The decayed, causally masked scores P = (Q K^T) * D * scale of one thread's m16n8
// accumulator values of a (C, C) tile: value 4 nb + 2 h8 + e sits at row r0 + 8 h8, column
// c0 + 8 nb + e. put(i, x) receives each; the mask is a select, not a branch (a branch per
// element cost a third of the SM80 walk). term(h8, column), when given, is added to each
// score before the mask.
template <class Acc, class Put, class Term = NoScoreTerm>
__device__ __forceinline__ void decay_mask_scores(Acc const& acc, const float* G, int r0, int c0, float scale,
                                                  Put&& put, Term term = {}) {
  const float g_row[2] = {G[r0], G[r0 + 8]};
  CUTE_UNROLL
  for (int nb = 0; nb < kChunk / 8; ++nb) {
    const float2 g_col = *reinterpret_cast<const float2*>(G + c0 + 8 * nb);
    CUTE_UNROLL
    for (int e = 0; e < 2; ++e) {
      CUTE_UNROLL
      for (int h8 = 0; h8 < 2; ++h8) {
        const int i = nb * 4 + h8 * 2 + e;
        float x = acc(i) * exp2_ftz(g_row[h8] - (e ? g_col.y : g_col.x)) * scale;
        if constexpr (!std::is_same_v<Term, NoScoreTerm>) x += term(h8, c0 + 8 * nb + e);
        put(i, c0 + 8 * nb + e <= r0 + 8 * h8 ? x : 0.f);
      }
    }
  }
}

// Partial sums of an m16n8 accumulator's two rows (r0, r0 + 8) summed over the quad of lanes
// that holds them: every lane of the quad gets the totals.
__device__ __forceinline__ void sum_over_quad(float (&part)[2]) {
  CUTE_UNROLL
  for (int j = 0; j < 2; ++j) {
    part[j] += __shfl_xor_sync(0xffffffffu, part[j], 1);
    part[j] += __shfl_xor_sync(0xffffffffu, part[j], 2);
  }
}

// dg's per-row dot products: part[j] of row r0 + 8 j summed over the four lanes that hold the
// row, stored by its first lane at dots[tile, token(pos0 + row), h] (rows inside the sequence).
template <class Token>
__device__ __forceinline__ void store_row_dots(const ChunkParams& p, float (&part)[2], int lane, int r0, int64_t pos0,
                                               int64_t len, int tile, int h, Token&& token) {
  sum_over_quad(part);
  if (lane % 4 == 0) {
    CUTE_UNROLL
    for (int j = 0; j < 2; ++j) {
      const int64_t pos = pos0 + r0 + 8 * j;
      if (pos < len) p.dots[(int64_t(tile) * p.B * p.T + token(pos)) * p.H + h] = part[j];
    }
  }
}

// One thread's m16n8 accumulator values (rows r0, r0 + 8: values 4j, 4j + 1 and 4j + 2,
// 4j + 3) times their rows' factors f[0], f[1].
template <class Acc>
__device__ __forceinline__ void scale_rows(Acc& acc, const float (&f)[2]) {
  CUTE_UNROLL
  for (int i = 0; i < size(acc); ++i) acc(i) *= f[(i / 2) % 2];
}

// The same values divided by their rows' divisors.
template <class Acc>
__device__ __forceinline__ void divide_rows(Acc& acc, const float* div, int r0) {
  const float inv[2] = {1.f / div[r0], 1.f / div[r0 + 8]};
  scale_rows(acc, inv);
}

// A warp's 16 staged output rows (rows 16 warp .. 16 warp + 15 of a (C, BV) tile in shared
// memory; staged(r, col) points at row r, column col) to global memory in 16-byte vectors:
// row r of the tile to o + token(pos0 + r) * row_stride, for rows inside the sequence.
template <int BV, class Elem, class Staged, class Token>
__device__ __forceinline__ void store_warp_rows(Elem* o, int64_t row_stride, Staged&& staged, int warp, int lane,
                                                int64_t pos0, int64_t len, Token&& token) {
  CUTE_UNROLL
  for (int j = 0; j < 16 * BV / 8 / 32; ++j) {
    const int i = lane + 32 * j;
    const int r = warp * 16 + i / (BV / 8), col = i % (BV / 8) * 8;
    if (pos0 + r < len)
      *reinterpret_cast<cute::uint128_t*>(o + token(pos0 + r) * row_stride + col) =
          *reinterpret_cast<const cute::uint128_t*>(staged(r, col));
  }
}

}  // namespace chunk
}  // namespace fla
