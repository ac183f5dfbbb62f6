// Host side of the generic fused recurrent op: checks, allocation, params, dispatch.
#include "recurrent/recurrent_api.h"

#include "common/cuda_check.h"
#include "recurrent/recurrent.h"

namespace fla {

namespace {

struct Dims {
  int64_t B, T, H, K, HV, V, N;
};

Dims check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& cu_seqlens) {
  check_cuda_tensor(q, "q", q);
  check_cuda_tensor(k, "k", q);
  check_cuda_tensor(v, "v", q);
  STD_TORCH_CHECK(q.dim() == 4 && v.dim() == 4, "fla_cuda: q and v must be [B, T, H, D]");
  Dims d{q.size(0), q.size(1), q.size(2), q.size(3), v.size(2), v.size(3), q.size(0)};
  check_sizes(k, "k", {d.B, d.T, d.H, d.K});
  check_sizes(v, "v", {d.B, d.T, d.HV, d.V});
  STD_TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                  "fla_cuda: q, k, v must share one dtype");
  STD_TORCH_CHECK(d.H > 0 && d.HV % d.H == 0, "fla_cuda: value heads must be a multiple of q/k heads");
  STD_TORCH_CHECK(d.K >= 1 && d.K <= 256 && d.V >= 1 && d.V <= 256, "fla_cuda: head dims must be in 1..256");
  d.N = check_cu_seqlens(cu_seqlens, q, d.B);
  return d;
}

RecurrentParams make_params(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& g,
                            const std::optional<Tensor>& gk, const std::optional<Tensor>& gv,
                            const std::optional<Tensor>& beta, const std::optional<Tensor>& a,
                            const std::optional<Tensor>& b, const std::optional<Tensor>& cu_seqlens, double scale,
                            bool reverse, bool delta, bool l2norm_qk, Dims& d) {
  d = check_inputs(q, k, v, cu_seqlens);
  RecurrentParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.B = static_cast<int>(d.B);
  p.T = static_cast<int>(d.T);
  p.H = static_cast<int>(d.H);
  p.HV = static_cast<int>(d.HV);
  p.K = static_cast<int>(d.K);
  p.V = static_cast<int>(d.V);
  p.N = static_cast<int>(d.N);
  p.scale = static_cast<float>(scale);
  p.reverse = reverse;
  p.delta = delta;
  p.l2norm_qk = l2norm_qk;
  p.g = opt_f32(g, "g", q, {d.B, d.T, d.HV});
  p.gk_heads = gk.has_value() ? static_cast<int>(gk->size(2)) : p.H;
  STD_TORCH_CHECK(p.gk_heads == p.H || p.gk_heads == p.HV, "fla_cuda: gk heads must be H or HV");
  p.gk = opt_f32(gk, "gk", q, {d.B, d.T, p.gk_heads, d.K});
  p.gv = opt_f32(gv, "gv", q, {d.B, d.T, d.HV, d.V});
  STD_TORCH_CHECK(!delta || beta.has_value(), "fla_cuda: the delta rule needs beta");
  p.beta_per_v = beta.has_value() && beta->dim() == 4;
  if (beta.has_value()) {
    check_cuda_tensor(*beta, "beta", q);
    p.beta_fp32 = beta->scalar_type() == ScalarType::Float;
    STD_TORCH_CHECK(p.beta_fp32 || beta->scalar_type() == q.scalar_type(),
                    "fla_cuda: `beta` must be float32 or q's dtype");
    if (p.beta_per_v) check_sizes(*beta, "beta", {d.B, d.T, d.HV, d.V});
    else check_sizes(*beta, "beta", {d.B, d.T, d.HV});
    p.beta = beta->data_ptr();
  }
  STD_TORCH_CHECK(a.has_value() == b.has_value(), "fla_cuda: a and b come together");
  if (a.has_value()) {
    check_cuda_tensor(*a, "a", q);
    check_cuda_tensor(*b, "b", q);
    check_sizes(*a, "a", {d.B, d.T, d.H, d.K});
    check_sizes(*b, "b", {d.B, d.T, d.H, d.K});
    STD_TORCH_CHECK(a->scalar_type() == q.scalar_type() && b->scalar_type() == q.scalar_type(),
                    "fla_cuda: a and b must have q's dtype");
    p.a = a->data_ptr();
    p.b = b->data_ptr();
  }
  p.cu_seqlens = cu_seqlens.has_value() ? static_cast<const int64_t*>(cu_seqlens->data_ptr()) : nullptr;
  p.ckpt_slots = d.B * d.T / kRecurrentCkpt + d.N + 1;
  return p;
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> recurrent_fwd(Tensor q, Tensor k, Tensor v, std::optional<Tensor> g,
                                                 std::optional<Tensor> gk, std::optional<Tensor> gv,
                                                 std::optional<Tensor> beta, std::optional<Tensor> a,
                                                 std::optional<Tensor> b, std::optional<Tensor> h0,
                                                 std::optional<Tensor> cu_seqlens, double scale, bool reverse,
                                                 bool delta, bool l2norm_qk, bool output_final_state,
                                                 bool save_checkpoints) {
  Dims d;
  RecurrentParams p = make_params(q, k, v, g, gk, gv, beta, a, b, cu_seqlens, scale, reverse, delta, l2norm_qk, d);
  torch::stable::accelerator::DeviceGuard guard(q.get_device());
  p.h0 = opt_f32(h0, "initial_state", q, {d.N, d.HV, d.K, d.V});
  Tensor o = torch::stable::new_empty(q, {d.B, d.T, d.HV, d.V});
  Tensor ht = output_final_state ? empty_f32(q, {d.N, d.HV, d.K, d.V}) : nothing(q);
  Tensor ckpt = save_checkpoints ? empty_f32(q, {p.ckpt_slots, d.HV, d.K, d.V}) : nothing(q);
  p.o = o.data_ptr();
  p.ht = output_final_state ? static_cast<float*>(ht.data_ptr()) : nullptr;
  p.checkpoints = save_checkpoints ? static_cast<float*>(ckpt.data_ptr()) : nullptr;
  cudaStream_t stream = current_stream(q);
  FLA_DTYPE_SWITCH(dtype_of(q, "q"), Elem, [&] {
    FLA_HEADDIM_SWITCH(p.K, KMAX, [&] { run_recurrent_fwd<Elem, KMAX>(p, stream); });
  });
  return {o, ht, ckpt};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> recurrent_bwd(
    Tensor q, Tensor k, Tensor v, std::optional<Tensor> g, std::optional<Tensor> gk, std::optional<Tensor> gv,
    std::optional<Tensor> beta, std::optional<Tensor> a, std::optional<Tensor> b, std::optional<Tensor> cu_seqlens,
    Tensor checkpoints, Tensor dout, std::optional<Tensor> dht, double scale, bool reverse, bool delta,
    bool l2norm_qk, bool need_dh0) {
  Dims d;
  RecurrentParams p = make_params(q, k, v, g, gk, gv, beta, a, b, cu_seqlens, scale, reverse, delta, l2norm_qk, d);
  torch::stable::accelerator::DeviceGuard guard(q.get_device());
  check_cuda_tensor(checkpoints, "checkpoints", q);
  check_sizes(checkpoints, "checkpoints", {p.ckpt_slots, d.HV, d.K, d.V});
  p.checkpoints = static_cast<float*>(checkpoints.data_ptr());
  check_cuda_tensor(dout, "do", q);
  check_sizes(dout, "do", {d.B, d.T, d.HV, d.V});
  STD_TORCH_CHECK(dout.scalar_type() == q.scalar_type(), "fla_cuda: do must have q's dtype");
  p.dout = dout.data_ptr();
  p.dht = opt_f32(dht, "dht", q, {d.N, d.HV, d.K, d.V});

  const int64_t NV = recurrent_value_tiles(p.V);
  const int64_t BT = d.B * d.T;
  const int64_t blocks = d.N * d.HV * NV;
  const int64_t kmax = d.K <= 64 ? 64 : (d.K <= 128 ? 128 : 256);
  Tensor scratch = empty_f32(q, {std::max<int64_t>(blocks, 1), kRecurrentCkpt, kmax, kRecurrentBV});
  Tensor dq = empty_f32(q, {NV, BT, d.HV, d.K});
  Tensor dk = empty_f32(q, {NV, BT, d.HV, d.K});
  Tensor dv = empty_f32(q, {d.B, d.T, d.HV, d.V});
  Tensor dg = p.g ? empty_f32(q, {NV, BT, d.HV}) : nothing(q);
  Tensor dgk = p.gk ? empty_f32(q, {NV, BT, d.HV, d.K}) : nothing(q);
  Tensor dgv = p.gv ? empty_f32(q, {d.B, d.T, d.HV, d.V}) : nothing(q);
  Tensor dbeta = !delta ? nothing(q)
                 : p.beta_per_v ? empty_f32(q, {d.B, d.T, d.HV, d.V})
                                : empty_f32(q, {NV, BT, d.HV});
  Tensor da = p.a ? empty_f32(q, {NV, BT, d.HV, d.K}) : nothing(q);
  Tensor db = p.a ? empty_f32(q, {NV, BT, d.HV, d.K}) : nothing(q);
  Tensor dh0 = need_dh0 ? empty_f32(q, {d.N, d.HV, d.K, d.V}) : nothing(q);
  auto f32 = [](const Tensor& t) { return static_cast<float*>(t.data_ptr()); };
  p.scratch = f32(scratch);
  p.dq_part = f32(dq);
  p.dk_part = f32(dk);
  p.dv = f32(dv);
  p.dg_part = p.g ? f32(dg) : nullptr;
  p.dgk_part = p.gk ? f32(dgk) : nullptr;
  p.dgv = p.gv ? f32(dgv) : nullptr;
  p.dbeta = delta ? f32(dbeta) : nullptr;
  p.da_part = p.a ? f32(da) : nullptr;
  p.db_part = p.a ? f32(db) : nullptr;
  p.dh0 = need_dh0 ? f32(dh0) : nullptr;
  cudaStream_t stream = current_stream(q);
  FLA_DTYPE_SWITCH(dtype_of(q, "q"), Elem, [&] {
    FLA_HEADDIM_SWITCH(p.K, KMAX, [&] { run_recurrent_bwd<Elem, KMAX>(p, stream); });
  });
  return {dq, dk, dv, dg, dgk, dgv, dbeta, da, db, dh0};
}

}  // namespace fla
