// Host side of the linear-attention normalisation: checks, allocation, params, dispatch; and
// chunk_linear_attn(normalize=True) as one op around the chunk pass (normalize_api.h).
#include "normalize/normalize_api.h"

#include "chunk/chunk_api.h"
#include "common/cuda_check.h"
#include "normalize/normalize.h"

namespace fla {

namespace {

// q, k [B,T,H,K] and the value dim V of the rows the normaliser divides.
NormalizeParams make_params(const Tensor& q, const Tensor& k, int64_t V, const std::optional<Tensor>& cu_seqlens,
                            const std::optional<Tensor>& chunk_offsets, double scale) {
  check_cuda_tensor(q, "q", q);
  check_cuda_tensor(k, "k", q);
  STD_TORCH_CHECK(q.dim() == 4, "fla_cuda: q must be [B, T, H, K]");
  NormalizeParams p{};
  p.B = static_cast<int>(q.size(0));
  p.T = static_cast<int>(q.size(1));
  p.H = static_cast<int>(q.size(2));
  p.K = static_cast<int>(q.size(3));
  p.V = static_cast<int>(V);
  check_sizes(k, "k", {p.B, p.T, p.H, p.K});
  STD_TORCH_CHECK(k.scalar_type() == q.scalar_type(), "fla_cuda: q and k must share one dtype");
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
  p.scale = static_cast<float>(scale);
  return p;
}

// A [B,T,H,V] tensor of q's dtype: o_raw, o, do.
void check_rows(const Tensor& x, const char* name, const Tensor& q, const NormalizeParams& p) {
  check_cuda_tensor(x, name, q);
  check_sizes(x, name, {p.B, p.T, p.H, p.V});
  STD_TORCH_CHECK(x.scalar_type() == q.scalar_type(), "fla_cuda: `", name, "` must have q's dtype");
}

// What the forward writes: z_final [N,H,K], den [B,T,H] and the carries.
std::tuple<Tensor, Tensor, Tensor> forward_outputs(NormalizeParams& p, const Tensor& q, const std::optional<Tensor>& z0) {
  p.z0 = opt_f32(z0, "z0", q, {p.N, p.H, p.K});
  Tensor z_final = empty_f32(q, {p.N, p.H, p.K});
  Tensor den = empty_f32(q, {p.B, p.T, p.H});
  Tensor k_carry = empty_f32(q, {p.chunks, p.H, p.K});
  p.z_final = static_cast<float*>(z_final.data_ptr());
  p.den = static_cast<float*>(den.data_ptr());
  p.k_carry = static_cast<float*>(k_carry.data_ptr());
  return {z_final, den, k_carry};
}

// The forward's key sums by the normaliser's kernels; o = o_raw / den too when p.o is set.
std::tuple<Tensor, Tensor, Tensor> run_forward(NormalizeParams& p, const Tensor& q, const std::optional<Tensor>& z0) {
  auto outputs = forward_outputs(p, q, z0);
  cudaStream_t stream = current_stream(q);
  FLA_DTYPE_SWITCH(dtype_of(q, "q"), Elem, [&] { run_normalize_fwd<Elem>(p, stream); });
  return outputs;
}

// The backward's first half (normalize.h); w and q_carry are kept in the returned tensors.
struct BwdDots {
  Tensor do_raw, dz0, w, q_carry;
};
BwdDots run_bwd_dots(NormalizeParams& p, const Tensor& q, const Tensor& o_ref, const char* o_name, const Tensor& den,
                     const Tensor& k_carry, const Tensor& dout, const std::optional<Tensor>& dz_final) {
  check_rows(o_ref, o_name, q, p);
  check_rows(dout, "do", q, p);
  p.o_raw = o_ref.data_ptr();
  p.den = const_cast<float*>(opt_f32(den, "den", q, {p.B, p.T, p.H}));
  p.k_carry = const_cast<float*>(opt_f32(k_carry, "k_carry", q, {p.chunks, p.H, p.K}));
  p.dz_final = opt_f32(dz_final, "dz_final", q, {p.N, p.H, p.K});
  p.dout = dout.data_ptr();
  BwdDots r{torch::stable::new_empty(o_ref, {p.B, p.T, p.H, p.V}), empty_f32(q, {p.N, p.H, p.K}),
            empty_f32(q, {p.B, p.T, p.H}), empty_f32(q, {p.chunks, p.H, p.K})};
  p.do_raw = r.do_raw.data_ptr();
  p.dz0 = static_cast<float*>(r.dz0.data_ptr());
  p.w = static_cast<float*>(r.w.data_ptr());
  p.q_carry = static_cast<float*>(r.q_carry.data_ptr());
  cudaStream_t stream = current_stream(q);
  FLA_DTYPE_SWITCH(dtype_of(q, "q"), Elem, [&] { run_normalize_bwd_dots<Elem>(p, stream); });
  return r;
}

// The backward's second half into dq, dk ([B,T,H,K], q's dtype; added to with accumulate).
void run_bwd_grads(NormalizeParams& p, const Tensor& q, Tensor& dq, Tensor& dk) {
  check_cuda_tensor(dq, "dq", q);
  check_cuda_tensor(dk, "dk", q);
  check_sizes(dq, "dq", {p.B, p.T, p.H, p.K});
  check_sizes(dk, "dk", {p.B, p.T, p.H, p.K});
  STD_TORCH_CHECK(dq.scalar_type() == q.scalar_type() && dk.scalar_type() == q.scalar_type(),
                  "fla_cuda: dq and dk must have q's dtype");
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  cudaStream_t stream = current_stream(q);
  FLA_DTYPE_SWITCH(dtype_of(q, "q"), Elem, [&] { run_normalize_bwd_grads<Elem>(p, stream); });
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> linear_attn_normalize_fwd(
    Tensor o_raw, Tensor q, Tensor k, std::optional<Tensor> z0, std::optional<Tensor> cu_seqlens,
    std::optional<Tensor> chunk_offsets, double scale) {
  STD_TORCH_CHECK(o_raw.dim() == 4, "fla_cuda: o_raw must be [B, T, H, V]");
  NormalizeParams p = make_params(q, k, o_raw.size(3), cu_seqlens, chunk_offsets, scale);
  check_rows(o_raw, "o_raw", q, p);
  torch::stable::accelerator::DeviceGuard guard(q.get_device());
  Tensor o = torch::stable::new_empty(o_raw, {p.B, p.T, p.H, p.V});
  p.o_raw = o_raw.data_ptr();
  p.o = o.data_ptr();
  auto [z_final, den, k_carry] = run_forward(p, q, z0);
  return {o, z_final, den, k_carry};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> linear_attn_normalize_bwd(
    Tensor o_raw, Tensor q, Tensor k, Tensor den, Tensor k_carry, Tensor dout, std::optional<Tensor> dz_final,
    std::optional<Tensor> cu_seqlens, std::optional<Tensor> chunk_offsets, double scale) {
  STD_TORCH_CHECK(o_raw.dim() == 4, "fla_cuda: o_raw must be [B, T, H, V]");
  NormalizeParams p = make_params(q, k, o_raw.size(3), cu_seqlens, chunk_offsets, scale);
  torch::stable::accelerator::DeviceGuard guard(q.get_device());
  const BwdDots r = run_bwd_dots(p, q, o_raw, "o_raw", den, k_carry, dout, dz_final);
  Tensor dq = torch::stable::new_empty(q, {p.B, p.T, p.H, p.K});
  Tensor dk = torch::stable::new_empty(q, {p.B, p.T, p.H, p.K});
  run_bwd_grads(p, q, dq, dk);
  return {r.do_raw, dq, dk, r.dz0};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> linear_attn_normalized_fwd(
    Tensor q, Tensor k, Tensor v, std::optional<Tensor> h0, std::optional<Tensor> z0,
    std::optional<Tensor> cu_seqlens, std::optional<Tensor> chunk_offsets, double scale, bool output_final_state) {
  STD_TORCH_CHECK(v.dim() == 4, "fla_cuda: v must be [B, T, H, V]");
  NormalizeParams p = make_params(q, k, v.size(3), cu_seqlens, chunk_offsets, scale);
  check_rows(v, "v", q, p);
  torch::stable::accelerator::DeviceGuard guard(q.get_device());
  if (chunk_fwd_folds_norm(q, v, cu_seqlens)) {   // the wgmma pass computes den as it walks
    auto [z_final, den, k_carry] = forward_outputs(p, q, z0);
    if (cu_seqlens.has_value())   // slots past the last chunk: an output, never uninitialised memory
      FLA_CUDA_CHECK(cudaMemsetAsync(p.k_carry, 0, k_carry.numel() * sizeof(float), current_stream(q)));
    const NormFwd norm{p.z0, p.den, p.k_carry, p.z_final, p.chunk_offsets};
    auto [o, ht] = chunk_simple_gla_fwd_impl(q, k, v, std::nullopt, std::nullopt, h0, cu_seqlens, scale,
                                             output_final_state, nullptr, &norm);
    return {o, ht, z_final, den, k_carry};
  }
  auto [z_final, den, k_carry] = run_forward(p, q, z0);   // den first: the walk divides by it
  auto [o, ht] = chunk_simple_gla_fwd_impl(q, k, v, std::nullopt, std::nullopt, h0, cu_seqlens, scale,
                                           output_final_state, static_cast<const float*>(den.data_ptr()));
  return {o, ht, z_final, den, k_carry};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> linear_attn_normalized_bwd(
    Tensor q, Tensor k, Tensor v, std::optional<Tensor> h0, std::optional<Tensor> cu_seqlens,
    std::optional<Tensor> chunk_offsets, Tensor o, Tensor den, Tensor k_carry, Tensor dout, std::optional<Tensor> dht,
    std::optional<Tensor> dz_final, double scale, bool need_dh0) {
  STD_TORCH_CHECK(v.dim() == 4, "fla_cuda: v must be [B, T, H, V]");
  NormalizeParams p = make_params(q, k, v.size(3), cu_seqlens, chunk_offsets, scale);
  check_rows(v, "v", q, p);
  torch::stable::accelerator::DeviceGuard guard(q.get_device());
  p.dots_of_output = true;
  // On the wgmma pass the dq and dk passes add the normaliser's gradient themselves (its
  // reverse carries then over chunks aligned as the dk pass walks them); else a kernel adds
  // it to theirs.
  const bool fold = chunk_bwd_folds_norm_grad(q, p.K, p.V);
  p.end_aligned = fold;
  const BwdDots r = run_bwd_dots(p, q, o, "o", den, k_carry, dout, dz_final);
  const NormGrad norm{static_cast<const float*>(r.w.data_ptr()), static_cast<const float*>(k_carry.data_ptr()),
                      static_cast<const float*>(r.q_carry.data_ptr())};
  auto [dq, dk, dv, dg, dh0] = chunk_simple_gla_bwd_impl(q, k, v, std::nullopt, std::nullopt, h0, cu_seqlens,
                                                         chunk_offsets, r.do_raw, dht, std::nullopt, scale, false,
                                                         need_dh0, fold ? &norm : nullptr);
  if (!fold) {
    p.accumulate = true;   // the normaliser's dq, dk go onto the chunk pass's
    run_bwd_grads(p, q, dq, dk);
  }
  return {dq, dk, dv, dh0, r.dz0};
}

}  // namespace fla
