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
// and per chunk exp(G_last) (key_decay). The scores are one tensor-core product per 16-row
// query sub-chunk a, on operands folded at its first row r = 16a:
//
//   Q_f = Q_a * exp(G_a - G_r) (<= 1),   K_f = K_{0..16a+15} * exp(G_r - G_j)
//
// K_f <= 1 for the earlier sub-chunks; inside sub-chunk a it grows up to exp(-span), span the
// sub-chunk's own gate sum (G_{r+15} - G_r). While every span of a 64-column slice stays above
// -kMaxSpan the product is exact up to the operands' rounding (as FLA's off-diagonal blocks);
// a slice where some span is stronger (gates near the -1e4 clamp, or fp16's narrow range) takes
// the diagonal sub-blocks elementwise in fp32 instead, exp(G_i - G_j) <= 1 for each pair.
//
// Layouts (contiguous): q, k, q~, k~ [B*T, H, DK] input dtype; g [B*T, H, DK] fp32 or the
// input dtype; A [B*T, H, C] input dtype; key_decay [slots, H, DK] fp32, where chunk c of
// sequence n has slot n * ceil(T / C) + c (dense) or chunk_offsets[n] + c (cu_seqlens).
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace fla {

struct GlaIntraParams {
  const void* q;
  const void* k;
  const void* g;
  bool g_fp32;               // else g has the input dtype
  void* q_gated;
  void* k_gated;
  void* A;
  float* key_decay;
  const int64_t* cu_seqlens;     // [N + 1] or null
  const int64_t* chunk_offsets;  // [N + 1] with cu_seqlens
  int B, T, H, N;
  int slots;                 // grid size: chunk slots (an upper bound with cu_seqlens)
  float scale;
};

template <typename Elem, int DK>
void run_gla_intra(const GlaIntraParams& p, cudaStream_t stream);

}  // namespace fla
