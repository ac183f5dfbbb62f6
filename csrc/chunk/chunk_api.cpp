// Host side of the chunk kernels: checks, allocation, and the passes that make the
// forward and the backward (the pass and its math: chunk.h).
#include "chunk/chunk_api.h"

#include "chunk/chunk.h"
#include "chunk/chunk_sm90.h"
#include "chunk/chunk_states_sm90.h"
#include "chunk/gla.h"
#include "common/cuda_check.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <type_traits>

namespace fla {

namespace {

struct Dims {
  int64_t B, T, H, K, V, N;
};

bool is_chunk_head_dim(int64_t d) { return d == 64 || d == 128 || d == 256; }

// launch(Elem{}) for q's dtype, float16 or bfloat16 (the chunk kernels' inputs); float is an error.
template <typename Launch>
void half_dtype_switch(const Tensor& q, Launch&& launch) {
  FLA_DTYPE_SWITCH(dtype_of(q, "q"), Elem, [&] {
    if constexpr (std::is_same_v<Elem, float>) {
      STD_TORCH_CHECK(false, "fla_cuda: the chunk kernels take float16 or bfloat16");
    } else {
      launch(Elem{});
    }
  });
}

Dims check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& g,
                  const std::optional<Tensor>& g_gamma, const std::optional<Tensor>& cu_seqlens) {
  check_cuda_tensor(q, "q", q);
  check_cuda_tensor(k, "k", q);
  check_cuda_tensor(v, "v", q);
  STD_TORCH_CHECK(q.dim() == 4 && v.dim() == 4, "fla_cuda: q and v must be [B, T, H, D]");
  Dims d{q.size(0), q.size(1), q.size(2), q.size(3), v.size(3), q.size(0)};
  check_sizes(k, "k", {d.B, d.T, d.H, d.K});
  check_sizes(v, "v", {d.B, d.T, d.H, d.V});
  STD_TORCH_CHECK(q.scalar_type() == ScalarType::BFloat16 || q.scalar_type() == ScalarType::Half,
                  "fla_cuda: the chunk kernels take float16 or bfloat16 q, k, v");
  STD_TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
                  "fla_cuda: q, k, v must share one dtype");
  STD_TORCH_CHECK(is_chunk_head_dim(d.K) && is_chunk_head_dim(d.V),
                  "fla_cuda: the chunk kernels take head dims K, V in {64, 128, 256}");
  STD_TORCH_CHECK(!(g.has_value() && g_gamma.has_value()), "fla_cuda: pass g or g_gamma, not both");
  d.N = check_cu_seqlens(cu_seqlens, q, d.B);
  return d;
}

// A pass over (q, k, v) with the gates and sequences of the op; the caller sets the rest.
ChunkParams pass_params(const Tensor& q, const Tensor& k, const Tensor& v, Tensor& o, const float* g,
                        const float* g_gamma, const std::optional<Tensor>& cu_seqlens, const Dims& d) {
  ChunkParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.o = o.data_ptr();
  p.g = g;
  p.g_gamma = g_gamma;
  p.cu_seqlens = cu_seqlens.has_value() ? static_cast<const int64_t*>(cu_seqlens->data_ptr()) : nullptr;
  p.B = static_cast<int>(d.B);
  p.T = static_cast<int>(d.T);
  p.H = static_cast<int>(d.H);
  p.DK = static_cast<int>(q.size(3));
  p.DV = static_cast<int>(v.size(3));
  p.N = static_cast<int>(d.N);
  p.state_stride_k = p.DV;  // a [DK, DV] state; transposed states swap these
  p.state_stride_v = 1;
  p.num_segs = 1;
  return p;
}

bool device_is_sm90(int device) {
  static int cached[64] = {};   // 0: not asked yet, 1: sm_90, 2: other
  if (device >= 0 && device < 64 && cached[device] != 0) return cached[device] == 1;
  int major = 0, minor = 0;
  FLA_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  FLA_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  const bool sm90 = major == 9 && minor == 0;
  if (device >= 0 && device < 64) cached[device] = sm90 ? 1 : 2;
  return sm90;
}

// Which kernel runs a pass: on sm_90, for DK in {64, 128}, the wgmma pass (chunk_sm90.h; its
// GLA mode for GLA), unless FLA_CUDA_CHUNK_SM90=0 (the SM80 pass everywhere, for comparisons).
// The value tile sets the grid and the number of dots tiles. Decided once per pass (run_pass).
struct PassKernel {
  bool sm90;
  int value_tile;
};

PassKernel pass_kernel(int64_t dk, int64_t dv, int device) {
  const char* env = std::getenv("FLA_CUDA_CHUNK_SM90");
  const bool sm90 = (dk == 64 || dk == 128) && dv % kChunkValueTileSm90 == 0 &&
                    !(env != nullptr && std::strcmp(env, "0") == 0) && device_is_sm90(device) &&
                    chunk_pass_sm90_built<__nv_bfloat16, 128>();
  return {sm90, sm90 ? kChunkValueTileSm90 : chunk_value_tile(static_cast<int>(dk))};
}

template <bool kGla>
void launch_pass(const ChunkParams& p, const Tensor& like, bool sm90, cudaStream_t stream) {
  half_dtype_switch(like, [&](auto e) {
    using Elem = decltype(e);
    if (sm90 && kGla && p.state_dots != nullptr) {
      if (p.DK == 64) run_chunk_pass_gla_sm90_dots<Elem, 64>(p, stream);
      else run_chunk_pass_gla_sm90_dots<Elem, 128>(p, stream);
    } else if (sm90 && kGla && p.states_out != nullptr) {
      if (p.DK == 64) run_chunk_pass_gla_sm90_states<Elem, 64>(p, stream);
      else run_chunk_pass_gla_sm90_states<Elem, 128>(p, stream);
    } else if (sm90 && kGla) {
      if (p.DK == 64) run_chunk_pass_gla_sm90<Elem, 64>(p, stream);
      else run_chunk_pass_gla_sm90<Elem, 128>(p, stream);
    } else if (sm90 && p.norm_w != nullptr) {
      if (p.DK == 64) run_chunk_pass_sm90_norm<Elem, 64>(p, stream);
      else run_chunk_pass_sm90_norm<Elem, 128>(p, stream);
    } else if (sm90 && p.norm_den != nullptr) {
      if (p.DK == 64) run_chunk_pass_sm90_den<Elem, 64>(p, stream);
      else run_chunk_pass_sm90_den<Elem, 128>(p, stream);
    } else if (sm90) {
      if (p.DK == 64) run_chunk_pass_sm90<Elem, 64>(p, stream);
      else run_chunk_pass_sm90<Elem, 128>(p, stream);
    } else {
      switch (p.DK) {
        case 64: run_chunk_pass<Elem, 64, kGla>(p, stream); break;
        case 128: run_chunk_pass<Elem, 128, kGla>(p, stream); break;
        case 256: run_chunk_pass<Elem, 256, kGla>(p, stream); break;
        default: STD_TORCH_CHECK(false, "fla_cuda: chunk head dim must be 64, 128 or 256");
      }
    }
  });
}

// Thread blocks of a pass that fit one SM: 2 for the SM80 pass (shared memory); for the
// wgmma pass the occupancy API says (1 at DK = 128: 256 threads of 210 registers; 2 at 64);
// its GLA mode takes 145 KB of shared memory at DK = 128 (two stages of q~, k~, v, A, A_lo).
int pass_blocks_per_sm(const ChunkParams& p, const Tensor& like, bool sm90, bool gla) {
  if (!sm90) return 2;
  if (gla) return 1;
  int blocks = 1;
  FLA_DTYPE_SWITCH(dtype_of(like, "q"), Elem, [&] {
    if constexpr (!std::is_same_v<Elem, float>) {
      blocks = p.DK == 64 ? chunk_pass_sm90_blocks_per_sm<Elem, 64>(p.dots != nullptr)
                          : chunk_pass_sm90_blocks_per_sm<Elem, 128>(p.dots != nullptr);
    }
  });
  return std::max(blocks, 1);
}

// The state-only launch of a split wgmma walk (chunk_states_sm90.h): every segment but the
// last in as many pieces as fill one wave of the states kernel (segments have at least two
// chunks: at least two pieces), folded in order into the pass's segment states.
void launch_segment_states_sm90(const ChunkParams& p, const Tensor& like, cudaStream_t stream) {
  int per_sm = 1;
  half_dtype_switch(like, [&](auto e) {
    using Elem = decltype(e);
    static const int cached[2] = {chunk_states_sm90_blocks_per_sm<Elem, 64>(),
                                  chunk_states_sm90_blocks_per_sm<Elem, 128>()};
    per_sm = cached[p.DK == 64 ? 0 : 1];
  });
  const int64_t groups = (p.DV / kChunkValueTileSm90 + 1) / 2 * p.H * p.N;   // blocks per piece
  const int64_t wave = sm_count(like.get_device()) * int64_t(std::max(per_sm, 1));
  const int64_t parts = std::clamp<int64_t>(wave / (groups * (p.num_segs - 1)), 1, p.seg_chunks);
  SegStateParams sp{};
  sp.pass = p;
  sp.pass.state_only = true;
  sp.pass.dots = nullptr;
  sp.pass.ht = nullptr;
  sp.part_chunks = static_cast<int>((p.seg_chunks + parts - 1) / parts);
  sp.parts = (p.seg_chunks + sp.part_chunks - 1) / sp.part_chunks;
  Tensor part_states = empty_f32(like, {p.N * p.num_segs * sp.parts, p.H, p.DK, p.DV});
  Tensor part_gates = empty_f32(like, {p.N * p.num_segs * sp.parts, p.H});
  sp.part_states = static_cast<float*>(part_states.data_ptr());
  sp.part_gates = static_cast<float*>(part_gates.data_ptr());
  half_dtype_switch(like, [&](auto e) {
    using Elem = decltype(e);
    if (p.DK == 64) run_chunk_states_sm90<Elem, 64>(sp, stream);
    else run_chunk_states_sm90<Elem, 128>(sp, stream);
  });
  SegFoldParams f{};
  f.part_states = sp.part_states;
  f.part_gates = sp.part_gates;
  f.seg_states = p.seg_states;
  f.seg_gates = p.seg_gates;
  f.N = p.N;
  f.H = p.H;
  f.num_segs = p.num_segs;
  f.parts = sp.parts;
  f.state_elems = int64_t(p.DK) * p.DV;
  run_chunk_seg_fold(f, stream);
}

int64_t value_tiles(int64_t dk, int64_t dv, int device) { return dv / pass_kernel(dk, dv, device).value_tile; }

// chunk_offsets [N + 1] int64 (first chunk slot of each packed sequence) comes with
// cu_seqlens; returns the number of chunk slots of per-chunk grids: packed,
// sum_n ceil(len_n / C) <= ceil(T / C) + N (blocks past the last chunk exit).
int64_t check_chunk_offsets(const Tensor& q, const std::optional<Tensor>& cu_seqlens,
                            const std::optional<Tensor>& chunk_offsets, const Dims& d) {
  STD_TORCH_CHECK(cu_seqlens.has_value() == chunk_offsets.has_value(), "fla_cuda: chunk_offsets comes with cu_seqlens");
  if (chunk_offsets.has_value()) {
    check_cuda_tensor(*chunk_offsets, "chunk_offsets", q);
    STD_TORCH_CHECK(chunk_offsets->scalar_type() == ScalarType::Long, "fla_cuda: chunk_offsets must be int64");
    check_sizes(*chunk_offsets, "chunk_offsets", {d.N + 1});
  }
  const int64_t chunks = (d.T + kChunk - 1) / kChunk;
  return cu_seqlens.has_value() ? chunks + d.N : d.B * chunks;
}

// One walk per (value tile, head, sequence) when the walks fill at least half of one wave
// (a quarter for the wgmma pass; the split costs an extra state-only launch, measured slower
// than a nearly full wave);
// otherwise dense batches split every sequence into segments of at least 2 chunks, as many
// as fit one wave (a partial second wave would double the time) (chunk.h).
// GLA mode (gla.h) splits the same way; its segment decays are per key row.
int64_t pass_segments(const ChunkParams& p, const Tensor& like, const PassKernel& kern, bool gla) {
  const int64_t blocks = p.DV / kern.value_tile * p.H * p.N;
  const int64_t chunks = (int64_t(p.T) + kChunk - 1) / kChunk;
  const int64_t wave = sm_count(like.get_device()) * int64_t(pass_blocks_per_sm(p, like, kern.sm90, gla));
  // the wgmma pass at one block per SM (B=4, T=4096, H=16, K=V=128: 128 walks) measured 0.180
  // ms unsplit, 0.185 ms split in two
  const bool split = kern.sm90 ? 4 * blocks <= wave : 2 * blocks < wave;
  if (p.cu_seqlens == nullptr && blocks > 0 && split) return std::max<int64_t>(std::min(wave / blocks, chunks / 2), 1);
  return 1;
}

template <bool kGla = false>
void run_pass(ChunkParams p, const Tensor& like, cudaStream_t stream) {
  const PassKernel kern = pass_kernel(p.DK, p.DV, like.get_device());
  const bool gates = p.g != nullptr || p.g_gamma != nullptr;
  STD_TORCH_CHECK(p.norm_w == nullptr || (kern.sm90 && !kGla && !gates),
                  "fla_cuda: the normaliser gradient folds into the wgmma pass without gates only");
  const int64_t segs = pass_segments(p, like, kern, kGla);
  STD_TORCH_CHECK(p.norm_den == nullptr || (kern.sm90 && !kGla && !gates && segs == 1 && p.o_row_div == nullptr),
                  "fla_cuda: the normaliser folds into the forward wgmma pass without gates or split walks only");
  const int64_t chunks = (int64_t(p.T) + kChunk - 1) / kChunk;
  if (segs < 2) {
    launch_pass<kGla>(p, like, kern.sm90, stream);
    return;
  }
  p.seg_chunks = static_cast<int>((chunks + segs - 1) / segs);
  p.num_segs = static_cast<int>((chunks + p.seg_chunks - 1) / p.seg_chunks);
  Tensor seg_states = empty_f32(like, {p.N * p.num_segs, p.H, p.DK, p.DV});
  Tensor seg_gates = kGla ? empty_f32(like, {p.N * p.num_segs, p.H, p.decay_cols ? p.DV : p.DK})
                          : empty_f32(like, {p.N * p.num_segs, p.H});
  p.seg_states = static_cast<float*>(seg_states.data_ptr());
  p.seg_gates = static_cast<float*>(seg_gates.data_ptr());
  if (kern.sm90 && !kGla) {
    launch_segment_states_sm90(p, like, stream);
  } else {
    ChunkParams local = p;     // segment-local states from zero, no outputs
    local.state_only = true;
    local.dots = nullptr;
    local.ht = nullptr;
    launch_pass<kGla>(local, like, kern.sm90, stream);
  }
  launch_pass<kGla>(p, like, kern.sm90, stream);
}

}  // namespace

std::tuple<Tensor, Tensor> chunk_simple_gla_fwd(Tensor q, Tensor k, Tensor v, std::optional<Tensor> g,
                                                std::optional<Tensor> g_gamma, std::optional<Tensor> h0,
                                                std::optional<Tensor> cu_seqlens, double scale,
                                                bool output_final_state) {
  return chunk_simple_gla_fwd_impl(q, k, v, g, g_gamma, h0, cu_seqlens, scale, output_final_state, nullptr);
}

bool chunk_fwd_folds_norm(const Tensor& q, const Tensor& v, const std::optional<Tensor>& cu_seqlens) {
  const Dims d = check_inputs(q, q, v, std::nullopt, std::nullopt, cu_seqlens);
  const PassKernel kern = pass_kernel(d.K, d.V, q.get_device());
  if (!kern.sm90) return false;
  Tensor no_output = q;   // a handle, not an allocation: the split decision reads sizes only
  ChunkParams p = pass_params(q, q, v, no_output, nullptr, nullptr, cu_seqlens, d);
  return pass_segments(p, q, kern, false) == 1;
}

std::tuple<Tensor, Tensor> chunk_simple_gla_fwd_impl(const Tensor& q, const Tensor& k, const Tensor& v,
                                                     const std::optional<Tensor>& g,
                                                     const std::optional<Tensor>& g_gamma,
                                                     const std::optional<Tensor>& h0,
                                                     const std::optional<Tensor>& cu_seqlens, double scale,
                                                     bool output_final_state, const float* o_row_div,
                                                     const NormFwd* norm) {
  const Dims d = check_inputs(q, k, v, g, g_gamma, cu_seqlens);
  torch::stable::accelerator::DeviceGuard guard(q.get_device());
  const float* gp = opt_f32(g, "g", q, {d.B, d.T, d.H});
  const float* gammap = opt_f32(g_gamma, "g_gamma", q, {d.H});
  Tensor o = torch::stable::new_empty(q, {d.B, d.T, d.H, d.V});
  Tensor ht = output_final_state ? empty_f32(q, {d.N, d.H, d.K, d.V}) : nothing(q);
  ChunkParams p = pass_params(q, k, v, o, gp, gammap, cu_seqlens, d);
  p.h0 = opt_f32(h0, "initial_state", q, {d.N, d.H, d.K, d.V});
  p.ht = output_final_state ? static_cast<float*>(ht.data_ptr()) : nullptr;
  p.scale_intra = p.scale_inter = static_cast<float>(scale);
  p.scale_update = 1.f;
  p.reverse = false;
  p.o_row_div = o_row_div;
  if (norm != nullptr) {
    p.norm_den = norm->den;
    p.norm_z0 = norm->z0;
    p.norm_k_carry = norm->k_carry;
    p.norm_z_final = norm->z_final;
    p.chunk_offsets = norm->chunk_offsets;
  }
  run_pass(p, q, current_stream(q));
  return {o, ht};
}

// With L = dLoss/dS (the state gradient, [K, V]):
//   dq = pass(do, v, k; state h0^T, forward)           scales (s, s, 1)
//   dk = pass(v, do, q; state dht^T, reverse)          scales (s, 1, s)
//   dv = pass(k, q, do; state dht, reverse) -> dh0     scales (s, 1, s)
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> chunk_simple_gla_bwd(
    Tensor q, Tensor k, Tensor v, std::optional<Tensor> g, std::optional<Tensor> g_gamma,
    std::optional<Tensor> h0, std::optional<Tensor> cu_seqlens, std::optional<Tensor> chunk_offsets, Tensor dout,
    std::optional<Tensor> dht, std::optional<Tensor> dg_sink, double scale, bool need_dg, bool need_dh0) {
  return chunk_simple_gla_bwd_impl(q, k, v, g, g_gamma, h0, cu_seqlens, chunk_offsets, dout, dht, dg_sink, scale,
                                   need_dg, need_dh0, nullptr);
}

bool chunk_bwd_folds_norm_grad(const Tensor& q, int64_t K, int64_t V) {
  return pass_kernel(V, K, q.get_device()).sm90;   // the dq, dk passes: head dim V, value dim K
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> chunk_simple_gla_bwd_impl(
    const Tensor& q, const Tensor& k, const Tensor& v, const std::optional<Tensor>& g,
    const std::optional<Tensor>& g_gamma, const std::optional<Tensor>& h0, const std::optional<Tensor>& cu_seqlens,
    const std::optional<Tensor>& chunk_offsets, const Tensor& dout, const std::optional<Tensor>& dht,
    const std::optional<Tensor>& dg_sink, double scale, bool need_dg, bool need_dh0, const NormGrad* norm) {
  const Dims d = check_inputs(q, k, v, g, g_gamma, cu_seqlens);
  STD_TORCH_CHECK(norm == nullptr || !need_dg, "fla_cuda: the normaliser gradient comes without dg");
  const int64_t slots = check_chunk_offsets(q, cu_seqlens, chunk_offsets, d);
  torch::stable::accelerator::DeviceGuard guard(q.get_device());
  check_cuda_tensor(dout, "do", q);
  check_sizes(dout, "do", {d.B, d.T, d.H, d.V});
  STD_TORCH_CHECK(dout.scalar_type() == q.scalar_type(), "fla_cuda: do must have q's dtype");
  const float* gp = opt_f32(g, "g", q, {d.B, d.T, d.H});
  const float* gammap = opt_f32(g_gamma, "g_gamma", q, {d.H});
  const float* h0p = opt_f32(h0, "initial_state", q, {d.N, d.H, d.K, d.V});
  const float* dhtp = opt_f32(dht, "dht", q, {d.N, d.H, d.K, d.V});
  const float s = static_cast<float>(scale);
  cudaStream_t stream = current_stream(q);

  Tensor dq = torch::stable::new_empty(q, {d.B, d.T, d.H, d.K});
  Tensor dk = torch::stable::new_empty(q, {d.B, d.T, d.H, d.K});
  Tensor dv = torch::stable::new_empty(q, {d.B, d.T, d.H, d.V});
  const int64_t tiles_k = value_tiles(d.V, d.K, q.get_device());   // dq and dk passes: q/k role has head dim V
  Tensor dq_dots = need_dg ? empty_f32(q, {tiles_k, d.B * d.T, d.H}) : nothing(q);
  Tensor dk_dots = need_dg ? empty_f32(q, {tiles_k, d.B * d.T, d.H}) : nothing(q);
  Tensor dh0 = need_dh0 ? empty_f32(q, {d.N, d.H, d.K, d.V}) : nothing(q);

  ChunkParams pq = pass_params(dout, v, k, dq, gp, gammap, cu_seqlens, d);
  pq.h0 = h0p;
  pq.state_stride_k = 1;           // h0^T: the pass state is [V, K]
  pq.state_stride_v = d.V;
  pq.scale_intra = pq.scale_inter = s;
  pq.scale_update = 1.f;
  if (need_dg) {
    pq.dot_with = q.data_ptr();
    pq.dots = static_cast<float*>(dq_dots.data_ptr());
  }
  const int64_t* offsets = chunk_offsets.has_value() ? static_cast<const int64_t*>(chunk_offsets->data_ptr()) : nullptr;
  if (norm != nullptr) {   // dq += w (k_carry + the chunk's keys up to the row)
    pq.norm_w = norm->w;
    pq.norm_carry = norm->k_carry;
    pq.chunk_offsets = offsets;
  }
  run_pass(pq, q, stream);

  // the two reversed passes start from dht and differ only in their operands and outputs
  auto reverse_pass = [&](const Tensor& qq, const Tensor& kk, const Tensor& vv, Tensor& out, bool transposed) {
    ChunkParams r = pass_params(qq, kk, vv, out, gp, gammap, cu_seqlens, d);
    r.h0 = dhtp;
    if (transposed) {              // dht^T: the pass state is [V, K]
      r.state_stride_k = 1;
      r.state_stride_v = d.V;
    }
    r.scale_intra = s;
    r.scale_inter = 1.f;
    r.scale_update = s;
    r.reverse = true;
    return r;
  };
  ChunkParams pk = reverse_pass(v, dout, q, dk, true);
  if (need_dg) {
    pk.dot_with = k.data_ptr();
    pk.dots = static_cast<float*>(dk_dots.data_ptr());
  }
  if (norm != nullptr) {   // dk += q_carry + the chunk's w q from the row on
    pk.norm_w = norm->w;
    pk.norm_carry = norm->q_carry;
    pk.norm_by_col = true;
    pk.chunk_offsets = offsets;
  }
  run_pass(pk, q, stream);
  ChunkParams pv = reverse_pass(k, q, dout, dv, false);
  pv.ht = need_dh0 ? static_cast<float*>(dh0.data_ptr()) : nullptr;
  run_pass(pv, q, stream);
  if (!need_dg) return {dq, dk, dv, nothing(q), dh0};

  Tensor dg = empty_f32(q, {d.B, d.T, d.H});
  Tensor chunk_totals = torch::stable::new_empty(q, {slots, d.H}, ScalarType::Double);
  GateGradParams grad{};
  grad.dq_dots = static_cast<const float*>(dq_dots.data_ptr());
  grad.dk_dots = static_cast<const float*>(dk_dots.data_ptr());
  grad.g = gp;
  grad.sink = opt_f32(dg_sink, "dg_sink", q, {d.N, d.H});
  grad.cu_seqlens = pq.cu_seqlens;
  grad.chunk_offsets = chunk_offsets.has_value() ? static_cast<const int64_t*>(chunk_offsets->data_ptr()) : nullptr;
  grad.chunk_totals = static_cast<double*>(chunk_totals.data_ptr());
  grad.dg = static_cast<float*>(dg.data_ptr());
  grad.B = static_cast<int>(d.B);
  grad.T = static_cast<int>(d.T);
  grad.H = static_cast<int>(d.H);
  grad.N = static_cast<int>(d.N);
  grad.tiles = static_cast<int>(tiles_k);
  grad.slots = static_cast<int>(slots);
  run_chunk_gate_grad(grad, stream);
  return {dq, dk, dv, dg, dh0};
}

namespace {

// The GLA ops' own checks (g, chunk_offsets); returns the number of chunk slots.
int64_t check_gla(const Tensor& q, const Tensor& g, const std::optional<Tensor>& cu_seqlens,
                  const std::optional<Tensor>& chunk_offsets, const Dims& d) {
  check_cuda_tensor(g, "g", q);
  check_sizes(g, "g", {d.B, d.T, d.H, d.K});
  STD_TORCH_CHECK(g.scalar_type() == ScalarType::Float || g.scalar_type() == q.scalar_type(),
                  "fla_cuda: g must be float32 or q's dtype");
  return check_chunk_offsets(q, cu_seqlens, chunk_offsets, d);
}

void fill_gla_inputs(GlaChunkInputs& p, const Tensor& q, const Tensor& k, const Tensor& g,
                     const std::optional<Tensor>& cu_seqlens, const int64_t* chunk_offsets, const Dims& d, int64_t slots,
                     double scale) {
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.g = g.data_ptr();
  p.g_fp32 = g.scalar_type() == ScalarType::Float;
  p.cu_seqlens = cu_seqlens.has_value() ? static_cast<const int64_t*>(cu_seqlens->data_ptr()) : nullptr;
  p.chunk_offsets = chunk_offsets;
  p.B = static_cast<int>(d.B);
  p.T = static_cast<int>(d.T);
  p.H = static_cast<int>(d.H);
  p.N = static_cast<int>(d.N);
  p.slots = static_cast<int>(slots);
  p.scale = static_cast<float>(scale);
}

}  // namespace

// GLA: gla_intra (gated q, k, scores, key decays), then the pass in GLA mode (gla.h).
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> chunk_gla_fwd(
    Tensor q, Tensor k, Tensor v, Tensor g, std::optional<Tensor> h0, std::optional<Tensor> cu_seqlens,
    std::optional<Tensor> chunk_offsets, double scale, bool output_final_state, bool for_backward) {
  const Dims d = check_inputs(q, k, v, std::nullopt, std::nullopt, cu_seqlens);
  torch::stable::accelerator::DeviceGuard guard(q.get_device());
  const int64_t slots = check_gla(q, g, cu_seqlens, chunk_offsets, d);
  Tensor q_gated = torch::stable::new_empty(q, {d.B, d.T, d.H, d.K});
  Tensor k_gated = torch::stable::new_empty(q, {d.B, d.T, d.H, d.K});
  Tensor A = torch::stable::new_empty(q, {d.B, d.T, d.H, int64_t(kChunk)});
  // A_lo: only the backward's dv reads it
  Tensor A_lo = for_backward ? torch::stable::new_empty(q, {d.B, d.T, d.H, int64_t(kChunk)})
                             : torch::stable::new_empty(q, {0});
  Tensor key_decay = empty_f32(q, {slots, d.H, d.K});
  Tensor o = torch::stable::new_empty(q, {d.B, d.T, d.H, d.V});
  Tensor ht = output_final_state ? empty_f32(q, {d.N, d.H, d.K, d.V}) : nothing(q);
  const int64_t* offsets = chunk_offsets.has_value() ? static_cast<const int64_t*>(chunk_offsets->data_ptr()) : nullptr;

  GlaIntraParams ip{};
  fill_gla_inputs(ip, q, k, g, cu_seqlens, offsets, d, slots, scale);
  ip.q_gated = q_gated.data_ptr();
  ip.k_gated = k_gated.data_ptr();
  ip.A = A.data_ptr();
  ip.A_lo = for_backward ? A_lo.data_ptr() : nullptr;
  ip.key_decay = static_cast<float*>(key_decay.data_ptr());

  ChunkParams p = pass_params(q_gated, k_gated, v, o, nullptr, nullptr, cu_seqlens, d);
  p.h0 = opt_f32(h0, "initial_state", q, {d.N, d.H, d.K, d.V});
  p.ht = output_final_state ? static_cast<float*>(ht.data_ptr()) : nullptr;
  p.scale_intra = p.scale_inter = static_cast<float>(scale);
  p.scale_update = 1.f;
  p.A = A.data_ptr();
  p.key_decay = ip.key_decay;
  p.chunk_offsets = offsets;

  cudaStream_t stream = current_stream(q);
  half_dtype_switch(q, [&](auto e) {
    using Elem = decltype(e);
    switch (d.K) {
      case 64: run_gla_intra<Elem, 64>(ip, stream); break;
      case 128: run_gla_intra<Elem, 128>(ip, stream); break;
      case 256: run_gla_intra<Elem, 256>(ip, stream); break;
      default: STD_TORCH_CHECK(false, "fla_cuda: chunk head dim must be 64, 128 or 256");
    }
  });
  run_pass<true>(p, q, stream);
  return {o, ht, q_gated, k_gated, A, A_lo, key_decay};
}

// GLA backward (gla.h), from the forward's q~, k~, A (+ A_lo) and key decays, with L = dLoss/dh:
//   dv, dh0 = pass(k~, q~, do; A^T + A_lo^T; state dht, chunks in reverse)   scales (1, -, s)
//   P       = pass(do, v, k~; state h0^T, column decays), fp32       scales (s, -, 1)
//             and h^T after each chunk (states)
//   R       = pass(v, do, q~; state dht^T, column decays, reverse)   scales (1, -, s)
//             and the column sums of states * L^T (state_dots)
//   dq, dk, dg = gla_bwd_intra(q, k, g, v, do, P, R, state_dots)
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> chunk_gla_bwd(
    Tensor q, Tensor k, Tensor v, Tensor g, std::optional<Tensor> h0, std::optional<Tensor> cu_seqlens,
    std::optional<Tensor> chunk_offsets, Tensor q_gated, Tensor k_gated, Tensor A, Tensor A_lo, Tensor key_decay,
    Tensor dout, std::optional<Tensor> dht, double scale, bool need_dh0) {
  const Dims d = check_inputs(q, k, v, std::nullopt, std::nullopt, cu_seqlens);
  torch::stable::accelerator::DeviceGuard guard(q.get_device());
  const int64_t slots = check_gla(q, g, cu_seqlens, chunk_offsets, d);
  for (auto [t, name] : {std::pair<const Tensor*, const char*>{&q_gated, "q_gated"}, {&k_gated, "k_gated"}}) {
    check_cuda_tensor(*t, name, q);
    check_sizes(*t, name, {d.B, d.T, d.H, d.K});
    STD_TORCH_CHECK(t->scalar_type() == q.scalar_type(), "fla_cuda: q_gated and k_gated must have q's dtype");
  }
  for (auto [t, name] : {std::pair<const Tensor*, const char*>{&A, "A"}, {&A_lo, "A_lo"}}) {
    check_cuda_tensor(*t, name, q);
    check_sizes(*t, name, {d.B, d.T, d.H, int64_t(kChunk)});
    STD_TORCH_CHECK(t->scalar_type() == q.scalar_type(), "fla_cuda: A and A_lo must have q's dtype");
  }
  check_cuda_tensor(key_decay, "key_decay", q);
  check_sizes(key_decay, "key_decay", {slots, d.H, d.K});
  STD_TORCH_CHECK(key_decay.scalar_type() == ScalarType::Float, "fla_cuda: key_decay must be float32");
  check_cuda_tensor(dout, "do", q);
  check_sizes(dout, "do", {d.B, d.T, d.H, d.V});
  STD_TORCH_CHECK(dout.scalar_type() == q.scalar_type(), "fla_cuda: do must have q's dtype");
  const float* h0p = opt_f32(h0, "initial_state", q, {d.N, d.H, d.K, d.V});
  const float* dhtp = opt_f32(dht, "dht", q, {d.N, d.H, d.K, d.V});
  const int64_t* offsets = chunk_offsets.has_value() ? static_cast<const int64_t*>(chunk_offsets->data_ptr()) : nullptr;
  const float s = static_cast<float>(scale);
  cudaStream_t stream = current_stream(q);

  Tensor dq = torch::stable::new_empty(q, {d.B, d.T, d.H, d.K});
  Tensor dk = torch::stable::new_empty(q, {d.B, d.T, d.H, d.K});
  Tensor dv = torch::stable::new_empty(q, {d.B, d.T, d.H, d.V});
  Tensor dq_inter = empty_f32(q, {d.B, d.T, d.H, d.K});
  Tensor dk_inter = empty_f32(q, {d.B, d.T, d.H, d.K});
  Tensor dg = torch::stable::new_empty(g, {d.B, d.T, d.H, d.K});
  Tensor states = empty_f32(q, {slots, d.H, d.V, d.K});
  Tensor state_dots = empty_f32(q, {slots, d.H, d.K});
  Tensor dh0 = need_dh0 ? empty_f32(q, {d.N, d.H, d.K, d.V}) : nothing(q);

  auto gla_pass = [&](const Tensor& qq, const Tensor& kk, const Tensor& vv, Tensor& out) {
    ChunkParams r = pass_params(qq, kk, vv, out, nullptr, nullptr, cu_seqlens, d);
    r.key_decay = static_cast<const float*>(key_decay.data_ptr());
    r.chunk_offsets = offsets;
    r.scale_inter = r.scale_update = 1.f;
    return r;
  };
  ChunkParams pv = gla_pass(k_gated, q_gated, dout, dv);
  pv.h0 = dhtp;
  pv.ht = need_dh0 ? static_cast<float*>(dh0.data_ptr()) : nullptr;
  pv.A = A.data_ptr();
  pv.A_lo = A_lo.data_ptr();
  pv.scale_update = s;
  pv.reverse = true;
  run_pass<true>(pv, q, stream);

  // the inter-chunk parts of dq and dk: states h^T, L^T [V, K] from h0^T, dht^T; fp32 out
  auto transposed_pass = [&](const Tensor& qq, const Tensor& kk, const Tensor& vv, Tensor& out, const float* h0) {
    ChunkParams r = gla_pass(qq, kk, vv, out);
    r.h0 = h0;
    r.state_stride_k = 1;
    r.state_stride_v = d.V;
    r.decay_cols = r.o_fp32 = true;
    return r;
  };
  ChunkParams pp = transposed_pass(dout, v, k_gated, dq_inter, h0p);
  pp.scale_inter = s;
  pp.states_out = static_cast<float*>(states.data_ptr());
  run_pass<true>(pp, q, stream);

  ChunkParams pr = transposed_pass(v, dout, q_gated, dk_inter, dhtp);
  pr.scale_update = s;
  pr.reverse = true;
  pr.states_in = static_cast<const float*>(states.data_ptr());
  pr.state_dots = static_cast<float*>(state_dots.data_ptr());
  run_pass<true>(pr, q, stream);

  GlaBwdIntraParams ip{};
  fill_gla_inputs(ip, q, k, g, cu_seqlens, offsets, d, slots, scale);
  ip.v = v.data_ptr();
  ip.dout = dout.data_ptr();
  ip.dq_inter = static_cast<const float*>(dq_inter.data_ptr());
  ip.dk_inter = static_cast<const float*>(dk_inter.data_ptr());
  ip.dq = dq.data_ptr();
  ip.dk = dk.data_ptr();
  ip.state_dots = static_cast<const float*>(state_dots.data_ptr());
  ip.dg = dg.data_ptr();
  ip.K = static_cast<int>(d.K);
  ip.V = static_cast<int>(d.V);
  half_dtype_switch(q, [&](auto e) { run_gla_bwd_intra<decltype(e)>(ip, stream); });
  return {dq, dk, dv, dg, dh0};
}

}  // namespace fla
