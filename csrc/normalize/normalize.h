// Linear-attention normalisation (FLA's chunk_linear_attn(normalize=True)), fused:
//
//   c_t   = z0 + sum_{s <= t} k_s            running key sum of t's sequence, fp32 [K]
//   den_t = scale * <q_t, c_t> + 1e-10
//   o_t   = o_raw_t / den_t                  z_final = c of the sequence's last token
//
// Backward, with w_t = -scale * <do_t, o_raw_t> / den_t^2:
//   do_raw_t = do_t / den_t,   dq_t = w_t c_t,   dk_s = dz_final + sum_{t >= s} w_t q_t,
//   dz0 = dz_final + sum_t w_t q_t.
//
// Both directions are a scan along T split in chunks of kNormChunk tokens: a chunk-totals
// kernel, a per-sequence scan of the (64x smaller) totals, then a kernel per chunk that
// walks its tokens from the scanned carry. Every thread owns one key channel, so there are
// no atomics and the result does not depend on the launch shape.
//
// Layouts (contiguous): q, k [B*T, H, K]; o_raw, o, do, do_raw [B*T, H, V] (input dtype);
// den, w [B*T, H] fp32; z0, z_final, dz_final, dz0 [N, H, K] fp32; chunk carries
// [chunks, H, K] fp32. Chunk c of sequence n is chunk_offsets[n] + c (packed sequences)
// or n * ceil(T / kNormChunk) + c.
#pragma once
#include <cuda_runtime.h>

#include <cstdint>

namespace fla {

constexpr int kNormChunk = 64;
constexpr int kNormThreads = 256;  // one key channel per thread: K <= 256

struct NormalizeParams {
  const void* q;
  const void* k;
  const void* o_raw;
  const int64_t* cu_seqlens;     // [N + 1] or null
  const int64_t* chunk_offsets;  // [N + 1] with cu_seqlens, else null
  int B, T, H, K, V, N;
  int64_t chunks;                // upper bound of the chunk count (the grid)
  float scale;

  // forward
  const float* z0;      // may be null
  void* o;
  float* z_final;
  float* den;
  float* k_carry;       // totals, then (in place) the key sum before each chunk

  // forward: o == nullptr computes den (and the carries) only

  // backward (reads den and k_carry of the forward)
  bool dots_of_output;  // o_raw holds the normalised output o: w_t = -scale <do_t, o_t> / den_t
  bool accumulate;      // dq, dk hold gradients the normaliser's are added to
  const void* dout;
  const float* dz_final;  // may be null
  void* do_raw;
  void* dq;
  void* dk;
  float* dz0;
  float* w;
  float* q_carry;       // totals of w_t q_t, then the sum after each chunk (+ dz_final)
  // backward: chunks aligned to each sequence's end, counted from it (chunk j holds tokens
  // [end - C (j + 1), end - C j)), as the reverse chunk pass walks them; set when that pass
  // takes q_carry (ChunkParams::norm_carry), and then only run_normalize_bwd_dots runs
  bool end_aligned;
};

template <typename T>
void run_normalize_fwd(const NormalizeParams& p, cudaStream_t stream);

// The backward in two halves: w, do_raw and the reverse carries of w q (+ dz_final, into
// dz0); then dq, dk. Between them the chunk pass's backward can run on do_raw, and its dq, dk
// take the normaliser's in place (accumulate); or, on the wgmma pass, its dq and dk passes fold
// the normaliser's in from w and the carries (ChunkParams::norm_w, end_aligned above), and the
// second half does not run.
template <typename T>
void run_normalize_bwd_dots(const NormalizeParams& p, cudaStream_t stream);

template <typename T>
void run_normalize_bwd_grads(const NormalizeParams& p, cudaStream_t stream);

}  // namespace fla
