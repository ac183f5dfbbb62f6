// Chunkwise GLA (elementwise key gate gk) on tensor cores: gla_intra, then the chunk pass in
// GLA mode (chunk.h).
//
// Per chunk of C = 64 positions, G = cumulative clamped gk inside the chunk ([C, DK], each
// column non-increasing). gla_intra writes, per position t and head:
//
//   q~_t = q_t * exp(G_t)                 (read by the pass for the inter-chunk term Q~ S)
//   k~_t = k_t * exp(G_last - G_t)        (for the state update  S = diag(exp(G_last)) S + K~^T V)
//   A_t  = scale * sum_k q_tk k_jk exp(G_tk - G_jk), j <= t in the chunk, 0 past t
//
// and per chunk exp(G_last) (key_decay). Within a query sub-chunk a (rows 16a..16a+15) the
// scores fold at its first row r = 16a:
//
//   Q_f = Q_a * exp(G_a - G_r) (<= 1),   K_f = K_j * exp(G_r - G_j)
//
// Off-diagonal (j < r): K_f <= 1, one bf16/fp16 tensor-core product, as FLA's off-diagonal
// blocks. Diagonal (r <= j <= i): K_f grows up to exp(-span), span = G_{r+15} - G_r of the
// sub-chunk; the fp32 folded operands are split into hi + lo parts in the input type and the
// block is Qh Kh^T + Qh Kl^T + Ql Kh^T (about 16 mantissa bits, like FLA's fp32 elementwise
// diagonal). A 64-column slice where some span is below -60 (fp16: below -5.5, its range ends
// at 65504) takes the diagonal elementwise in fp32 instead: exp(G_i - G_j) <= 1 per pair.
//
// Layouts (contiguous): q, k, q~, k~ [B*T, H, DK] input dtype; g [B*T, H, DK] fp32 or the
// input dtype; A [B*T, H, C] input dtype; key_decay [slots, H, DK] fp32, where chunk c of
// sequence n has slot n * ceil(T / C) + c (dense) or chunk_offsets[n] + c (cu_seqlens).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace fla {

// What gla_intra and gla_bwd_intra both read: the inputs, the chunk slots, the scale.
struct GlaChunkInputs {
  const void* q;
  const void* k;
  const void* g;
  bool g_fp32;                   // else g has the input dtype
  const int64_t* cu_seqlens;     // [N + 1] or null
  const int64_t* chunk_offsets;  // [N + 1] with cu_seqlens
  int B, T, H, N;
  int slots;                     // grid size: chunk slots (an upper bound with cu_seqlens)
  float scale;
};

struct GlaIntraParams : GlaChunkInputs {
  void* q_gated;
  void* k_gated;
  void* A;
  void* A_lo;                // may be null: A - A rounded to the input dtype (the backward's dv)
  float* key_decay;
};

template <typename Elem, int DK>
void run_gla_intra(const GlaIntraParams& p, cudaStream_t stream);

// Backward (chunk_gla_bwd in chunk_api.cpp). The chunk pass in GLA mode makes, besides dv and
// dh0, the inter-chunk parts of dq and dk without their gates (fp32, [B*T, H, K]):
//
//   P_t = scale * dO_t h_c^T,    R_t = v_t L_{c+1}^T      (h_c: state entering t's chunk,
//                                                           L_{c+1}: dL/dh leaving it)
//
// and gla_bwd_intra finishes, per chunk, with dA = scale * dO V^T (j <= i):
//
//   dq_i = exp(G_i) P_i + sum_{j <= i} dA_ij k_j exp(G_i - G_j)
//   dk_j = exp(G_last - G_j) R_j + sum_{i >= j} dA_ij q_i exp(G_i - G_j)
//
// on tensor cores through folds (dq: K at the query sub-chunk's first row, dk: Q at the key
// sub-chunk's last row) split into hi + lo operands: <= 1 off the diagonal sub-blocks, up to
// 2^-span on them, as the forward's diagonal (pair by pair in fp32 where a span is too
// strong). The gate gradient (reference/chunk_gla.py)
//
//   dgk_t = sum_{s >= t} (q_s dq_s - k_s dk_s) + rowsum(ht * dht)
//
// is that sum to the chunk's end plus rowsum(h_{c+1} * L_{c+1}) (= dgk at the next chunk's
// first step), taken as FLA takes it:
//
//   rowsum(h_{c+1} * L_{c+1}) = exp(G_last) rowsum(h_c * L_{c+1}) + sum_{s in c} k_s dk_inter_s
//
// (dk_inter_s = exp(G_last - G_s) R_s), the forward-walk pass storing the state entering
// each chunk and the reverse-walk pass forming the row sums against its state (state_dots).
// The k dk_inter terms of rows s >= t then cancel exactly against those inside dk; with
// h_{c+1} itself, built from k~ rounded to bf16, they left that rounding in dg (1.4e-2 in
// the last chunk, against dht). Summing the terms of later chunks instead would add up
// their bf16-operand errors over the whole sequence.
struct GlaBwdIntraParams : GlaChunkInputs {
  const void* v;
  const void* dout;
  const float* dq_inter;         // P [B*T, H, K]
  const float* dk_inter;         // R [B*T, H, K]
  void* dq;                      // [B*T, H, K] input dtype
  void* dk;
  const float* state_dots;       // [slots, H, K]
  void* dg;                      // [B*T, H, K] g's dtype; 0 where g was clamped
  int K, V;
};

template <typename Elem>
void run_gla_bwd_intra(const GlaBwdIntraParams& p, cudaStream_t stream);

}  // namespace fla
