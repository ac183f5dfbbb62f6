// Host side of the linear-attention normalisation: checks, allocation, params, dispatch.
#include "normalize/normalize_api.h"

#include "common/cuda_check.h"
#include "normalize/normalize.h"

namespace fla {

namespace {

NormalizeParams make_params(const Tensor& o_raw, const Tensor& q, const Tensor& k,
                            const std::optional<Tensor>& cu_seqlens, const std::optional<Tensor>& chunk_offsets,
                            double scale) {
  check_cuda_tensor(q, "q", q);
  check_cuda_tensor(k, "k", q);
  check_cuda_tensor(o_raw, "o_raw", q);
  STD_TORCH_CHECK(q.dim() == 4 && o_raw.dim() == 4, "fla_cuda: q and o_raw must be [B, T, H, D]");
  NormalizeParams p{};
  p.B = static_cast<int>(q.size(0));
  p.T = static_cast<int>(q.size(1));
  p.H = static_cast<int>(q.size(2));
  p.K = static_cast<int>(q.size(3));
  p.V = static_cast<int>(o_raw.size(3));
  check_sizes(k, "k", {p.B, p.T, p.H, p.K});
  check_sizes(o_raw, "o_raw", {p.B, p.T, p.H, p.V});
  STD_TORCH_CHECK(k.scalar_type() == q.scalar_type() && o_raw.scalar_type() == q.scalar_type(),
                  "fla_cuda: q, k, o_raw must share one dtype");
  STD_TORCH_CHECK(p.K >= 1 && p.K <= kNormThreads && p.V >= 1 && p.V <= kNormThreads,
                  "fla_cuda: the normalisation takes K, V <= ", kNormThreads);
  p.N = static_cast<int>(check_cu_seqlens(cu_seqlens, q, p.B));
  STD_TORCH_CHECK(cu_seqlens.has_value() == chunk_offsets.has_value(),
                  "fla_cuda: chunk_offsets comes with cu_seqlens");
  const int64_t per_seq = (static_cast<int64_t>(p.T) + kNormChunk - 1) / kNormChunk;
  if (cu_seqlens.has_value()) {
    check_cuda_tensor(*chunk_offsets, "chunk_offsets", q);
    STD_TORCH_CHECK(chunk_offsets->scalar_type() == ScalarType::Long, "fla_cuda: chunk_offsets must be int64");
    check_sizes(*chunk_offsets, "chunk_offsets", {p.N + 1});
    p.cu_seqlens = static_cast<const int64_t*>(cu_seqlens->data_ptr());
    p.chunk_offsets = static_cast<const int64_t*>(chunk_offsets->data_ptr());
    p.chunks = per_seq + p.N;  // a bound: each sequence adds at most one partial chunk
  } else {
    p.chunks = per_seq * p.B;
  }
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.o_raw = o_raw.data_ptr();
  p.scale = static_cast<float>(scale);
  return p;
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> linear_attn_normalize_fwd(
    Tensor o_raw, Tensor q, Tensor k, std::optional<Tensor> z0, std::optional<Tensor> cu_seqlens,
    std::optional<Tensor> chunk_offsets, double scale) {
  NormalizeParams p = make_params(o_raw, q, k, cu_seqlens, chunk_offsets, scale);
  torch::stable::accelerator::DeviceGuard guard(q.get_device());
  p.z0 = opt_f32(z0, "z0", q, {p.N, p.H, p.K});
  Tensor o = torch::stable::new_empty(o_raw, {p.B, p.T, p.H, p.V});
  Tensor z_final = empty_f32(q, {p.N, p.H, p.K});
  Tensor den = empty_f32(q, {p.B, p.T, p.H});
  Tensor k_carry = empty_f32(q, {p.chunks, p.H, p.K});
  p.o = o.data_ptr();
  p.z_final = static_cast<float*>(z_final.data_ptr());
  p.den = static_cast<float*>(den.data_ptr());
  p.k_carry = static_cast<float*>(k_carry.data_ptr());
  cudaStream_t stream = current_stream(q);
  FLA_DTYPE_SWITCH(dtype_of(q, "q"), Elem, [&] { run_normalize_fwd<Elem>(p, stream); });
  return {o, z_final, den, k_carry};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> linear_attn_normalize_bwd(
    Tensor o_raw, Tensor q, Tensor k, Tensor den, Tensor k_carry, Tensor dout, std::optional<Tensor> dz_final,
    std::optional<Tensor> cu_seqlens, std::optional<Tensor> chunk_offsets, double scale) {
  NormalizeParams p = make_params(o_raw, q, k, cu_seqlens, chunk_offsets, scale);
  torch::stable::accelerator::DeviceGuard guard(q.get_device());
  check_cuda_tensor(dout, "do", q);
  check_sizes(dout, "do", {p.B, p.T, p.H, p.V});
  STD_TORCH_CHECK(dout.scalar_type() == q.scalar_type(), "fla_cuda: `do` must have q's dtype");
  p.den = const_cast<float*>(opt_f32(den, "den", q, {p.B, p.T, p.H}));
  p.k_carry = const_cast<float*>(opt_f32(k_carry, "k_carry", q, {p.chunks, p.H, p.K}));
  p.dz_final = opt_f32(dz_final, "dz_final", q, {p.N, p.H, p.K});
  p.dout = dout.data_ptr();
  Tensor do_raw = torch::stable::new_empty(o_raw, {p.B, p.T, p.H, p.V});
  Tensor dq = torch::stable::new_empty(q, {p.B, p.T, p.H, p.K});
  Tensor dk = torch::stable::new_empty(q, {p.B, p.T, p.H, p.K});
  Tensor dz0 = empty_f32(q, {p.N, p.H, p.K});
  Tensor w = empty_f32(q, {p.B, p.T, p.H});
  Tensor q_carry = empty_f32(q, {p.chunks, p.H, p.K});
  p.do_raw = do_raw.data_ptr();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dz0 = static_cast<float*>(dz0.data_ptr());
  p.w = static_cast<float*>(w.data_ptr());
  p.q_carry = static_cast<float*>(q_carry.data_ptr());
  cudaStream_t stream = current_stream(q);
  FLA_DTYPE_SWITCH(dtype_of(q, "q"), Elem, [&] { run_normalize_bwd<Elem>(p, stream); });
  return {do_raw, dq, dk, dz0};
}

}  // namespace fla
