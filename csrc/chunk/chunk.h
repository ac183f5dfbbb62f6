// The chunkwise form of the scalar-gate recurrence (simple GLA, linear attention,
// retention) on tensor cores: one "pass", run once for the forward and three times for the
// backward. Two kernels implement it: chunk_kernel.cuh (SM80 MMAs, any DK, GLA mode) and,
// on sm_90 for DK in {64, 128}, chunk_pass_sm90.cuh (wgmma; chunk_sm90.h).
//
// A pass walks one sequence in chunks of C = 64 positions (processing order: forward in
// time, or backward with `reverse`), carrying a [DK, BV] fp32 state S in registers:
//
//   G_i   = gamma_1 + ... + gamma_i            (cumulative log gate inside the chunk)
//   O     = scale_inter * diag(exp(G)) Q S  +  scale_intra * ((Q K^T) * D) V
//   S     = exp(G_last) S  +  scale_update * (K * exp(G_last - G))^T V
//
// with D_ij = exp(G_i - G_j) for j <= i, else 0. The forward is the pass on (q, k, v);
// the backward (see chunk_api.cpp) is the same pass on (do, v, k), then reversed on
// (v, do, q) and (k, q, do): dq, dk and dv are each the output of one pass.
//
// In reverse processing order the gate of position p is g at time t + 1 (the decay
// between step t and the step after it), 0 at the first position, and the final state
// gets the one gate left over (g at the sequence's first step): that makes the
// reverse pass propagate dL/dS exactly as the forward propagates S.
//
// Layouts (contiguous):
//   q, k           [B*T, H, DK]   input dtype
//   v, o, dot_with [B*T, H, DV]   input dtype
//   g              [B*T, H]       fp32 (or g_gamma [H], or neither: no decay)
//   h0, ht         [N, H] x (DK, DV) fp32, element strides of the last two given
//   dots           [DV / BV, B*T, H] fp32: per value tile, <fp32 output row, dot_with row>
//
// Long sequences with few heads are split into segments of seg_chunks chunks so that the
// GPU fills up (issue: B=1, T=32768): a state-only launch writes each segment's local
// state (from zero) and total log gate; the full launch then starts segment s from
//   S_in(s) = exp(gamma(s-1)) S_in(s-1) + U(s-1),   S_in(0) = h0
// folded in a fixed order (deterministic). seg_states [N*NS, H, DK, DV], seg_gates [N*NS, H]
// (log2 units).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace fla {

constexpr int kChunk = 64;
// Gates are clamped from below: -inf - (-inf) would be NaN; exp(-1e4) is 0 anyway.
constexpr float kMinLogGate = -1e4f;

struct ChunkParams {
  const void* q;
  const void* k;
  const void* v;
  void* o;
  const float* g;            // per-step log gates, or null
  const float* g_gamma;      // constant per-head log gate, or null
  const float* h0;           // may be null (zero state)
  float* ht;                 // may be null
  int64_t state_stride_k;    // element strides of the DK and DV dims of h0 / ht
  int64_t state_stride_v;
  const void* dot_with;      // may be null
  float* dots;               // with dot_with
  const float* o_row_div;    // [B*T, H] fp32 or null: o is stored divided by it row by row
                             // (linear attention's normaliser); not with dots, not in GLA mode
  const int64_t* cu_seqlens; // [N + 1] or null
  int B, T, H, DK, DV, N;
  float scale_intra, scale_inter, scale_update;
  bool reverse;
  // segments (dense batches only; num_segs == 1: one walk per sequence)
  int num_segs, seg_chunks;
  bool state_only;           // the first launch of a split walk
  float* seg_states;
  float* seg_gates;
  // GLA mode (run_chunk_pass<..., true>): q and k arrive gated (q exp(G), k exp(G_last - G),
  // from gla_intra), the intra-chunk scores are read from A instead of computed, and the
  // state decays per key row by key_decay. No gates, reverse or dots; split walks keep one
  // decay per key row and segment in seg_gates ([N*NS, H, DK], products, not logs).
  const void* A;               // [B*T, H, C] input dtype
  const void* A_lo;            // [B*T, H, C] input dtype, or null (not with state_dots)
  const float* key_decay;      // [chunk slots, H, DK] exp(G_last) of each chunk
  const int64_t* chunk_offsets;   // [N + 1] first slot of each sequence (with cu_seqlens)
  // GLA-mode passes of the backward (chunk_gla_bwd in chunk_api.cpp):
  //  - reverse walks the chunks last to first, positions inside a chunk and the chunks'
  //    alignment staying those of the forward (so A and key_decay slots match), reads A
  //    transposed, and the final state is the one before the first chunk;
  //  - decay_cols decays the state's columns instead of its rows (transposed states);
  //  - A == nullptr drops the intra-chunk term; A_lo (may be null) adds A_lo V for scores
  //    to about 16 bits (dv); scale_update scales K~^T V;
  //  - o_fp32: o is an fp32 tensor, written from the accumulators;
  //  - states_out: the state entering each chunk, fp32 (the row sums below cancel; FLA
  //    keeps these states in fp32 too), [slots, H, DK, DV] (the pass's own orientation), at
  //    the chunk's slot;
  //  - states_in + state_dots: per state column, sum over rows of states_in[slot] * S with S
  //    the state entering the chunk from the walk's past, [slots, H, DV] fp32 (dg of GLA:
  //    rowsum(h_c * dL/dh_{c+1}) from the forward walk's states and the reverse walk's).
  bool decay_cols;
  bool o_fp32;
  float* states_out;
  const float* states_in;
  float* state_dots;
  // Linear attention's normaliser gradient (normalize.h) folded into the dq and dk passes of
  // its backward (wgmma pass, no gates): with w the per-token weights,
  //   rows (dq):            P_ij += w_i,  O_i += w_i carry(chunk)
  //   columns (dk, reverse): P_ij += w_j,  O_i += carry(chunk)
  // (j <= i, processing order). carry(chunk) is the normaliser's carry at the chunk's start in
  // processing order (k_carry; for the reverse walk q_carry over chunks aligned to the
  // sequence's end), at slot chunk_offsets[n] + chunk (packed) or n * ceil(T / C) + chunk.
  const float* norm_w;       // [B*T, H] fp32, or null: no normaliser
  const float* norm_carry;   // [slots, H, DV] fp32
  bool norm_by_col;
  // Linear attention's normaliser computed by the forward pass itself (wgmma pass, no gates,
  // one walk per sequence; the separate kernels in normalize.h otherwise):
  //   c_t = z0 + sum_{s <= t} k_s,   den_t = scale_inter <q_t, c_t> + 1e-10,   o_t /= den_t
  // with <q_t, c_t> = <q_t, carry(chunk)> + the row sum of the chunk's masked Q K^T. Value
  // tile 0 writes what the backward reads: den, the carry before each chunk (slots as
  // norm_carry's) and the sequence's final key sum.
  float* norm_den;           // [B*T, H] fp32, or null: no normaliser
  const float* norm_z0;      // [N, H, DK] fp32, or null (zero)
  float* norm_k_carry;       // [slots, H, DK] fp32
  float* norm_z_final;       // [N, H, DK] fp32
};

// Value columns per thread block: the state tile [DK, BV] stays in registers. 32 for
// DK >= 128: more, smaller blocks keep two blocks (8 warps) on every SM.
#ifdef __CUDACC__
__host__ __device__
#endif
constexpr int chunk_value_tile(int DK) { return DK >= 128 ? 32 : 64; }

template <typename Elem, int DK, bool kGla = false>
void run_chunk_pass(const ChunkParams& p, cudaStream_t stream);

// The scalar gate's gradient from the backward passes' per-token dots (chunk_cuda.py):
//   dg_t = sum over s >= t in t's sequence of a_s, plus sink of the sequence,
//   a_s  = sum over tiles of dq_dots[tile, s] - sum over tiles of dk_dots[tile, s]
// (every (source j < t <= sink i) pair carries g_t), summed in fp64 in a fixed order, and 0
// where g was clamped (g < kMinLogGate). One slot per (chunk of kChunk rows) as GLA's grid
// (chunk_offsets with cu_seqlens); chunk_totals [slots, H] fp64 is scratch.
struct GateGradParams {
  const float* dq_dots;        // [tiles, B*T, H]
  const float* dk_dots;        // [tiles, B*T, H]
  const float* g;              // [B*T, H] or null (no clamp mask)
  const float* sink;           // [N, H] or null
  const int64_t* cu_seqlens;   // [N + 1] or null
  const int64_t* chunk_offsets;   // [N + 1] with cu_seqlens
  double* chunk_totals;
  float* dg;                   // [B*T, H]
  int B, T, H, N, tiles, slots;
};

void run_chunk_gate_grad(const GateGradParams& p, cudaStream_t stream);

}  // namespace fla
