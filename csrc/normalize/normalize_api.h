// Op entry points of the linear-attention normalisation (registered in ops.cpp).
#pragma once
#include <tuple>

#include "common/stable.h"

namespace fla {

// o = o_raw / den (o_raw's dtype); z_final [N,H,K] fp32; den [B,T,H] fp32 and
// k_carry [chunks,H,K] fp32 are kept for the backward. chunk_offsets [N+1] int64 (the
// first 64-token chunk of each packed sequence) comes with cu_seqlens.
std::tuple<Tensor, Tensor, Tensor, Tensor> linear_attn_normalize_fwd(
    Tensor o_raw, Tensor q, Tensor k, std::optional<Tensor> z0, std::optional<Tensor> cu_seqlens,
    std::optional<Tensor> chunk_offsets, double scale);

// do_raw (o_raw's dtype), dq, dk (q's dtype), dz0 [N,H,K] fp32.
std::tuple<Tensor, Tensor, Tensor, Tensor> linear_attn_normalize_bwd(
    Tensor o_raw, Tensor q, Tensor k, Tensor den, Tensor k_carry, Tensor dout, std::optional<Tensor> dz_final,
    std::optional<Tensor> cu_seqlens, std::optional<Tensor> chunk_offsets, double scale);

// chunk_linear_attn(normalize=True) in one op: den first (the key sums need only q, k), then
// the chunk pass stores o = o_raw / den directly (o_raw never goes to memory). Returns o, ht
// [N,H,K,V] fp32 (empty unless output_final_state), z_final, and den, k_carry for the backward.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> linear_attn_normalized_fwd(
    Tensor q, Tensor k, Tensor v, std::optional<Tensor> h0, std::optional<Tensor> z0,
    std::optional<Tensor> cu_seqlens, std::optional<Tensor> chunk_offsets, double scale, bool output_final_state);

// Its backward from o: the normaliser's first half, the chunk pass's backward on do_raw, then
// the normaliser's dq, dk added onto the chunk pass's in place (no separate sums). dq, dk, dv
// (q's dtype), dh0 [N,H,K,V] fp32 (empty unless need_dh0), dz0 [N,H,K] fp32.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> linear_attn_normalized_bwd(
    Tensor q, Tensor k, Tensor v, std::optional<Tensor> h0, std::optional<Tensor> cu_seqlens,
    std::optional<Tensor> chunk_offsets, Tensor o, Tensor den, Tensor k_carry, Tensor dout, std::optional<Tensor> dht,
    std::optional<Tensor> dz_final, double scale, bool need_dh0);

}  // namespace fla
