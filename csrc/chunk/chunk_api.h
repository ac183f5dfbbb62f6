// Op entry points of the chunkwise scalar-gate kernels (registered in ops.cpp).
#pragma once
#include <tuple>

#include "common/stable.h"

namespace fla {

// o [B,T,H,V] (input dtype), ht [N,H,K,V] fp32 (empty unless output_final_state).
std::tuple<Tensor, Tensor> chunk_simple_gla_fwd(Tensor q, Tensor k, Tensor v, std::optional<Tensor> g,
                                                std::optional<Tensor> g_gamma, std::optional<Tensor> h0,
                                                std::optional<Tensor> cu_seqlens, double scale,
                                                bool output_final_state);

// Linear attention's normaliser computed by the forward pass itself (ChunkParams::norm_den):
// den [B*T, H], k_carry [slots, H, K] (slots past the packed sequences' last chunk are not
// written), z_final [N, H, K] out; z0 [N, H, K] or null; chunk_offsets with cu_seqlens.
struct NormFwd {
  const float* z0;
  float* den;
  float* k_carry;
  float* z_final;
  const int64_t* chunk_offsets;
};
// Whether the forward pass of (q, v) computes it (sm_90 wgmma pass, K and V in {64, 128}, one
// walk per sequence).
bool chunk_fwd_folds_norm(const Tensor& q, const Tensor& v, const std::optional<Tensor>& cu_seqlens);

// The same with each output row divided by o_row_div [B*T, H] fp32 (linear attention's
// normaliser from its own kernels), or by den computed in the pass (norm; no gates), or not.
std::tuple<Tensor, Tensor> chunk_simple_gla_fwd_impl(const Tensor& q, const Tensor& k, const Tensor& v,
                                                     const std::optional<Tensor>& g,
                                                     const std::optional<Tensor>& g_gamma,
                                                     const std::optional<Tensor>& h0,
                                                     const std::optional<Tensor>& cu_seqlens, double scale,
                                                     bool output_final_state, const float* o_row_div,
                                                     const NormFwd* norm = nullptr);

// dq, dk, dv (input dtype); dg [B,T,H] fp32, the gradient of each step's log gate (0 where
// g < -1e4, which the kernels clamp; summed over steps by the caller for g_gamma), plus
// dg_sink [N,H] (<ht, dht>) when given, empty unless need_dg; dh0 [N,H,K,V] fp32 (empty
// unless need_dh0). chunk_offsets [N + 1] (first chunk of each packed sequence) with cu_seqlens.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> chunk_simple_gla_bwd(
    Tensor q, Tensor k, Tensor v, std::optional<Tensor> g, std::optional<Tensor> g_gamma,
    std::optional<Tensor> h0, std::optional<Tensor> cu_seqlens, std::optional<Tensor> chunk_offsets, Tensor dout,
    std::optional<Tensor> dht, std::optional<Tensor> dg_sink, double scale, bool need_dg, bool need_dh0);

// Linear attention's normaliser gradient (normalize.h) for the dq and dk passes of
// chunk_simple_gla_bwd_impl to fold in (ChunkParams::norm_w): w [B*T, H], the forward's
// key carries k_carry [slots, H, K] and the backward's q_carry [slots, H, K] over chunks
// aligned to each sequence's end (NormalizeParams::end_aligned).
struct NormGrad {
  const float* w;
  const float* k_carry;
  const float* q_carry;
};
// Whether those passes run on the kernel that folds it in (the wgmma pass, sm_90, K and V in
// {64, 128}).
bool chunk_bwd_folds_norm_grad(const Tensor& q, int64_t K, int64_t V);

// chunk_simple_gla_bwd, with the normaliser gradient folded in when norm is given (no gates,
// no dg).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> chunk_simple_gla_bwd_impl(
    const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& g,
    const std::optional<Tensor>& g_gamma, const std::optional<Tensor>& h0, const std::optional<Tensor>& cu_seqlens,
    const std::optional<Tensor>& chunk_offsets, const Tensor& dout, const std::optional<Tensor>& dht,
    const std::optional<Tensor>& dg_sink, double scale, bool need_dg, bool need_dh0, const NormGrad* norm);

// Chunkwise GLA forward: o [B,T,H,V] (input dtype), ht [N,H,K,V] fp32 (empty unless
// output_final_state), and what the backward reads (gla.h): q_gated, k_gated [B,T,H,K], A and
// A_lo [B,T,H,64] (input dtype), key_decay [slots,H,K] fp32. g [B,T,H,K] log gates, fp32 or the
// input dtype; chunk_offsets [N + 1] (first chunk of each packed sequence) with cu_seqlens.
// Without for_backward (inference) A_lo is left out: an empty tensor.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> chunk_gla_fwd(
    Tensor q, Tensor k, Tensor v, Tensor g, std::optional<Tensor> h0, std::optional<Tensor> cu_seqlens,
    std::optional<Tensor> chunk_offsets, double scale, bool output_final_state, bool for_backward);

// Chunkwise GLA backward from the forward's intermediates: dq, dk, dv (input dtype), dg (g's
// dtype; 0 where g < -1e4, which the kernels clamp), dh0 [N,H,K,V] fp32 (empty unless need_dh0).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> chunk_gla_bwd(
    Tensor q, Tensor k, Tensor v, Tensor g, std::optional<Tensor> h0, std::optional<Tensor> cu_seqlens,
    std::optional<Tensor> chunk_offsets, Tensor q_gated, Tensor k_gated, Tensor A, Tensor A_lo, Tensor key_decay,
    Tensor dout, std::optional<Tensor> dht, double scale, bool need_dh0);

}  // namespace fla
