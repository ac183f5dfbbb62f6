// Op entry points of the generic fused recurrent kernels (registered in ops.cpp).
#pragma once
#include <tuple>

#include "common/stable.h"

namespace fla {

std::tuple<Tensor, Tensor, Tensor> recurrent_fwd(Tensor q, Tensor k, Tensor v, std::optional<Tensor> g,
                                                 std::optional<Tensor> gk, std::optional<Tensor> gv,
                                                 std::optional<Tensor> beta, std::optional<Tensor> a,
                                                 std::optional<Tensor> b, std::optional<Tensor> h0,
                                                 std::optional<Tensor> cu_seqlens, double scale, bool reverse,
                                                 bool delta, bool l2norm_qk, bool output_final_state,
                                                 bool save_checkpoints);

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> recurrent_bwd(
    Tensor q, Tensor k, Tensor v, std::optional<Tensor> g, std::optional<Tensor> gk, std::optional<Tensor> gv,
    std::optional<Tensor> beta, std::optional<Tensor> a, std::optional<Tensor> b, std::optional<Tensor> cu_seqlens,
    Tensor checkpoints, Tensor dout, std::optional<Tensor> dht, double scale, bool reverse, bool delta,
    bool l2norm_qk, bool need_dh0);

}  // namespace fla
