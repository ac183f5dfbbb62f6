// The fused recurrent form of every family, as one generic recurrence.
//
// State S [K, V] per (sequence, value head), fp32. One step t (processing order; with
// `reverse` each sequence is scanned from its last token to its first):
//
//   w   = a_t^T S                          (low rank: IPLR / DPLR; uses S_{t-1})
//   S   = exp(g_t) diag(exp(gk_t)) S diag(exp(gv_t))
//   S  += b_t w^T
//   v'  = beta_t * (v_t - S^T k_t)  if delta, else v_t
//   S  += k_t v'^T
//   o_t = S^T (scale q_t)
//
// simple GLA / linear attention / retention: g; GLA: gk, gv; delta rule: delta, beta;
// gated delta rule: + g (optionally gk, gv); IPLR: a, b; DPLR: + gk.
//
// This header is the only thing shared between host and kernels: plain pointers, sizes
// and flags. Tensors are contiguous; layouts:
//   q, k, a, b         [B*T, H,  K]      (input dtype)
//   v, o               [B*T, HV, V]      (input dtype)
//   g                  [B*T, HV]         fp32
//   gk                 [B*T, HG, K]      fp32, HG = H or HV
//   gv                 [B*T, HV, V]      fp32
//   beta               [B*T, HV] or [B*T, HV, V] fp32 or the input dtype
//   h0, ht, dht, dh0   [N, HV, K, V]     fp32
//   checkpoints        [slots, HV, K, V] fp32, slots = B*T / CKPT + N + 1
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace fla {

constexpr int kRecurrentBV = 32;       // value columns per thread block (one per lane)
constexpr int kRecurrentCkpt = 16;     // forward saves the state every this many steps for the backward

struct RecurrentParams {
  // inputs
  const void* q;
  const void* k;
  const void* v;
  const void* a;
  const void* b;
  const float* g;
  const float* gk;
  const float* gv;
  const void* beta;           // fp32, or the input dtype when !beta_fp32
  const float* h0;
  const int64_t* cu_seqlens;  // [N + 1] or null
  // outputs
  void* o;
  float* ht;
  float* checkpoints;
  // sizes
  int B, T, H, HV, K, V, N;
  int gk_heads;               // H or HV
  float scale;
  bool reverse, delta, beta_per_v, beta_fp32;
  bool l2norm_qk;             // q, k <- x / sqrt(|x|^2 + 1e-6) in-kernel (FLA's use_qk_l2norm_in_kernel)
  int64_t ckpt_slots;

  // backward only
  const void* dout;           // [B*T, HV, V] input dtype
  const float* dht;           // may be null
  float* scratch;             // [grid blocks, CKPT, KMAX, BV] replayed states of one segment
  float* dq_part;             // [NV, B*T, HV, K]  partial sums over value tiles
  float* dk_part;
  float* da_part;
  float* db_part;
  float* dgk_part;            // [NV, B*T, HV, K]
  float* dg_part;             // [NV, B*T, HV]
  float* dbeta;               // [NV, B*T, HV] (scalar beta, partial) or [B*T, HV, V]
  float* dv;                  // [B*T, HV, V]
  float* dgv;                 // [B*T, HV, V]
  float* dh0;                 // [N, HV, K, V]
};

template <typename T, int KMAX>
void run_recurrent_fwd(const RecurrentParams& p, cudaStream_t stream);

template <typename T, int KMAX>
void run_recurrent_bwd(const RecurrentParams& p, cudaStream_t stream);

#ifdef __CUDACC__
__host__ __device__
#endif
inline int recurrent_value_tiles(int V) { return (V + kRecurrentBV - 1) / kRecurrentBV; }

}  // namespace fla
