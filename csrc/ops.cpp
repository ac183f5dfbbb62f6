// Op schemas (the contract torch.compile and the Python layer see) and their CUDA
// implementations. Fake (meta) implementations and autograd live in Python
// (fla_cuda/ops/recurrent_cuda.py), as in pytorch/extension-cpp.
#include "common/stable.h"
#include "chunk/chunk_api.h"
#include "normalize/normalize_api.h"
#include "recurrent/recurrent_api.h"

STABLE_TORCH_LIBRARY(fla_cuda, m) {
  m.def(
      "recurrent_fwd(Tensor q, Tensor k, Tensor v, Tensor? g, Tensor? gk, Tensor? gv, Tensor? beta, "
      "Tensor? a, Tensor? b, Tensor? h0, Tensor? cu_seqlens, float scale, bool reverse, bool delta, "
      "bool l2norm_qk, bool output_final_state, bool save_checkpoints) -> (Tensor o, Tensor ht, Tensor checkpoints)");
  m.def(
      "recurrent_bwd(Tensor q, Tensor k, Tensor v, Tensor? g, Tensor? gk, Tensor? gv, Tensor? beta, "
      "Tensor? a, Tensor? b, Tensor? cu_seqlens, Tensor checkpoints, Tensor do, Tensor? dht, float scale, "
      "bool reverse, bool delta, bool l2norm_qk, bool need_dh0) -> (Tensor dq_part, Tensor dk_part, Tensor dv, "
      "Tensor dg_part, Tensor dgk_part, Tensor dgv, Tensor dbeta, Tensor da_part, Tensor db_part, Tensor dh0)");
  m.def(
      "chunk_simple_gla_fwd(Tensor q, Tensor k, Tensor v, Tensor? g, Tensor? g_gamma, Tensor? h0, "
      "Tensor? cu_seqlens, float scale, bool output_final_state) -> (Tensor o, Tensor ht)");
  m.def(
      "chunk_simple_gla_bwd(Tensor q, Tensor k, Tensor v, Tensor? g, Tensor? g_gamma, Tensor? h0, "
      "Tensor? cu_seqlens, Tensor? chunk_offsets, Tensor do, Tensor? dht, Tensor? dg_sink, float scale, "
      "bool need_dg, bool need_dh0) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dg, Tensor dh0)");
  m.def(
      "chunk_gla_fwd(Tensor q, Tensor k, Tensor v, Tensor g, Tensor? h0, Tensor? cu_seqlens, "
      "Tensor? chunk_offsets, float scale, bool output_final_state, bool for_backward) -> (Tensor o, Tensor ht, "
      "Tensor q_gated, "
      "Tensor k_gated, Tensor A, Tensor A_lo, Tensor key_decay)");
  m.def(
      "chunk_gla_bwd(Tensor q, Tensor k, Tensor v, Tensor g, Tensor? h0, Tensor? cu_seqlens, "
      "Tensor? chunk_offsets, Tensor q_gated, Tensor k_gated, Tensor A, Tensor A_lo, Tensor key_decay, Tensor do, "
      "Tensor? dht, float scale, bool need_dh0) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dg, Tensor dh0)");
  m.def(
      "linear_attn_normalize_fwd(Tensor o_raw, Tensor q, Tensor k, Tensor? z0, Tensor? cu_seqlens, "
      "Tensor? chunk_offsets, float scale) -> (Tensor o, Tensor z_final, Tensor den, Tensor k_carry)");
  m.def(
      "linear_attn_normalize_bwd(Tensor o_raw, Tensor q, Tensor k, Tensor den, Tensor k_carry, Tensor do, "
      "Tensor? dz_final, Tensor? cu_seqlens, Tensor? chunk_offsets, float scale) -> "
      "(Tensor do_raw, Tensor dq, Tensor dk, Tensor dz0)");
  m.def(
      "linear_attn_normalized_fwd(Tensor q, Tensor k, Tensor v, Tensor? h0, Tensor? z0, Tensor? cu_seqlens, "
      "Tensor? chunk_offsets, float scale, bool output_final_state) -> (Tensor o, Tensor ht, Tensor z_final, "
      "Tensor den, Tensor k_carry)");
  m.def(
      "linear_attn_normalized_bwd(Tensor q, Tensor k, Tensor v, Tensor? h0, Tensor? cu_seqlens, "
      "Tensor? chunk_offsets, Tensor o, Tensor den, Tensor k_carry, Tensor do, Tensor? dht, Tensor? dz_final, "
      "float scale, bool need_dh0) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dh0, Tensor dz0)");
}

STABLE_TORCH_LIBRARY_IMPL(fla_cuda, CUDA, m) {
  m.impl("recurrent_fwd", TORCH_BOX(&fla::recurrent_fwd));
  m.impl("recurrent_bwd", TORCH_BOX(&fla::recurrent_bwd));
  m.impl("chunk_simple_gla_fwd", TORCH_BOX(&fla::chunk_simple_gla_fwd));
  m.impl("chunk_simple_gla_bwd", TORCH_BOX(&fla::chunk_simple_gla_bwd));
  m.impl("chunk_gla_fwd", TORCH_BOX(&fla::chunk_gla_fwd));
  m.impl("chunk_gla_bwd", TORCH_BOX(&fla::chunk_gla_bwd));
  m.impl("linear_attn_normalize_fwd", TORCH_BOX(&fla::linear_attn_normalize_fwd));
  m.impl("linear_attn_normalize_bwd", TORCH_BOX(&fla::linear_attn_normalize_bwd));
  m.impl("linear_attn_normalized_fwd", TORCH_BOX(&fla::linear_attn_normalized_fwd));
  m.impl("linear_attn_normalized_bwd", TORCH_BOX(&fla::linear_attn_normalized_bwd));
}
