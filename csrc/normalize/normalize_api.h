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

}  // namespace fla
