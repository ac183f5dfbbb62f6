// The scalar gate's gradient (chunk.h, GateGradParams): a reverse sum per sequence and head of
// the per-token dots the backward passes emit. Three launches, each linear in T: the totals
// of every chunk of kChunk rows; per (sequence, head), the sum of the chunks after each chunk
// (plus the sink); then each chunk's rows from it. All sums run in a fixed order
// (deterministic) and in fp64: dg adds up to T terms that largely cancel.
#include <cuda_runtime.h>

#include "chunk/chunk.h"
#include "chunk/chunk_loc.cuh"
#include "common/cuda_check.h"
#include "common/sequence_slots.cuh"

namespace fla {
namespace chunk {
namespace {

// Per-chunk kernels: a block takes one chunk slot and kHeads heads; thread (part, head) owns
// the kRows consecutive rows part * kRows.. of its head (a warp reads 32 heads of one row).
constexpr int kHeads = 32, kParts = 8, kThreads = kHeads * kParts, kRows = kChunk / kParts;
// The per-sequence scan: a block per (sequence, head), kScanThreads contiguous runs of chunks.
constexpr int kScanThreads = 256;

struct ThreadRows {
  int head, part;
  bool ok;   // a head of the tensor, and the chunk is a real one
  ChunkLoc loc;
  int rows;  // rows of the chunk inside its sequence
};

__device__ __forceinline__ ThreadRows thread_rows(const GateGradParams& p) {
  ThreadRows t;
  t.head = blockIdx.y * kHeads + threadIdx.x % kHeads;
  t.part = threadIdx.x / kHeads;
  const bool located = locate_chunk(blockIdx.x, p.cu_seqlens, p.chunk_offsets, p.N, p.T, t.loc);
  t.rows = located ? int(min(int64_t(kChunk), t.loc.len - t.loc.c * kChunk)) : 0;
  t.ok = located && t.head < p.H;
  return t;
}

// a_s of the thread's rows (0 past the chunk's end): the tiles summed in order, dq's then dk's.
// Every load of a batch of kTileBatch tiles is issued before the first add: a loop over the
// tiles per row waited for one round trip to memory per row (about 10 us per launch).
constexpr int kTileBatch = 2;
__device__ __forceinline__ void row_terms(const GateGradParams& p, const ThreadRows& t, float (&a)[kRows]) {
  const int64_t tile_stride = int64_t(p.B) * p.T * p.H;
  int64_t idx[kRows];
  bool valid[kRows];
  float dq[kRows], dk[kRows];
#pragma unroll
  for (int i = 0; i < kRows; ++i) {
    const int r = t.part * kRows + i;
    valid[i] = t.ok && r < t.rows;
    idx[i] = valid[i] ? (t.loc.bos + t.loc.c * kChunk + r) * p.H + t.head : 0;
    dq[i] = dk[i] = 0.f;
  }
  for (int tile0 = 0; tile0 < p.tiles; tile0 += kTileBatch) {
    float xq[kTileBatch][kRows], xk[kTileBatch][kRows];
#pragma unroll
    for (int j = 0; j < kTileBatch; ++j) {
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        const bool ok = valid[i] && tile0 + j < p.tiles;
        const int64_t at = (tile0 + j) * tile_stride + idx[i];
        xq[j][i] = ok ? p.dq_dots[at] : 0.f;   // + 0 leaves a sum as it is
        xk[j][i] = ok ? p.dk_dots[at] : 0.f;
      }
    }
#pragma unroll
    for (int j = 0; j < kTileBatch; ++j) {
#pragma unroll
      for (int i = 0; i < kRows; ++i) {
        dq[i] += xq[j][i];
        dk[i] += xk[j][i];
      }
    }
  }
#pragma unroll
  for (int i = 0; i < kRows; ++i) a[i] = dq[i] - dk[i];
}

__global__ void __launch_bounds__(kThreads) chunk_totals_kernel(const GateGradParams p) {
  __shared__ double s_part[kParts][kHeads];
  const ThreadRows t = thread_rows(p);
  float a[kRows];
  row_terms(p, t, a);
  double sum = 0.0;
#pragma unroll
  for (int i = 0; i < kRows; ++i) sum += a[i];
  s_part[t.part][threadIdx.x % kHeads] = sum;
  __syncthreads();
  if (t.part == 0 && t.head < p.H) {
    double total = 0.0;
    for (int part = 0; part < kParts; ++part) total += s_part[part][threadIdx.x % kHeads];
    p.chunk_totals[int64_t(blockIdx.x) * p.H + t.head] = total;   // 0 for slots past the end
  }
}

// In place: chunk_totals[slot] <- sink + the totals of the sequence's chunks after the slot.
// Thread i takes a run of consecutive chunks; the runs' sums are combined in shared memory.
__global__ void __launch_bounds__(kScanThreads) later_chunks_kernel(const GateGradParams p) {
  __shared__ double s_run[kScanThreads];
  const int n = blockIdx.x, h = blockIdx.y, i = threadIdx.x;
  int64_t s0, s1;   // the sequence's slots
  sequence_slots<kChunk>(n, p.cu_seqlens, p.chunk_offsets, p.T, s0, s1);
  const int64_t per = (s1 - s0 + kScanThreads - 1) / kScanThreads;
  const int64_t r0 = min(s1, s0 + i * per), r1 = min(s1, r0 + per);
  double run = 0.0;
#pragma unroll 8
  for (int64_t s = r0; s < r1; ++s) run += p.chunk_totals[s * p.H + h];
  s_run[i] = run;
  __syncthreads();
  double acc = p.sink != nullptr ? double(p.sink[int64_t(n) * p.H + h]) : 0.0;
  for (int j = kScanThreads - 1; j > i; --j) acc += s_run[j];
  for (int64_t s = r1 - 1; s >= r0; --s) {
    double* x = p.chunk_totals + s * p.H + h;
    const double total = *x;
    *x = acc;
    acc += total;
  }
}

__global__ void __launch_bounds__(kThreads) gate_grad_kernel(const GateGradParams p) {
  __shared__ double s_rows[kParts][kHeads];   // sums of each part's rows
  const ThreadRows t = thread_rows(p);
  const int lane_head = threadIdx.x % kHeads;
  float a[kRows];
  row_terms(p, t, a);
  double rows_sum = 0.0;
#pragma unroll
  for (int i = 0; i < kRows; ++i) rows_sum += a[i];
  s_rows[t.part][lane_head] = rows_sum;
  __syncthreads();
  if (!t.ok || t.part * kRows >= t.rows) return;
  // the sink and the later chunks, the later parts of this chunk; then this part's rows backwards
  double acc = p.chunk_totals[int64_t(blockIdx.x) * p.H + t.head];
  for (int part = kParts - 1; part > t.part; --part) acc += s_rows[part][lane_head];
  const int64_t row0 = t.loc.bos + t.loc.c * kChunk + t.part * kRows;
  bool clamped[kRows];   // read before the stores: dg may alias g as far as the compiler knows
#pragma unroll
  for (int i = 0; i < kRows; ++i)
    clamped[i] = p.g != nullptr && t.part * kRows + i < t.rows && p.g[(row0 + i) * p.H + t.head] < kMinLogGate;
#pragma unroll
  for (int i = kRows - 1; i >= 0; --i) {
    if (t.part * kRows + i < t.rows) {
      acc += a[i];
      p.dg[(row0 + i) * p.H + t.head] = clamped[i] ? 0.f : static_cast<float>(acc);
    }
  }
}

}  // namespace
}  // namespace chunk

void run_chunk_gate_grad(const GateGradParams& p, cudaStream_t stream) {
  using namespace chunk;
  const dim3 grid(static_cast<unsigned>(p.slots), static_cast<unsigned>((p.H + kHeads - 1) / kHeads));
  if (grid.x * grid.y == 0 || p.N == 0) return;
  chunk_totals_kernel<<<grid, kThreads, 0, stream>>>(p);
  FLA_CHECK_LAUNCH();
  later_chunks_kernel<<<dim3(static_cast<unsigned>(p.N), static_cast<unsigned>(p.H)), kScanThreads, 0, stream>>>(p);
  FLA_CHECK_LAUNCH();
  gate_grad_kernel<<<grid, kThreads, 0, stream>>>(p);
  FLA_CHECK_LAUNCH();
}

}  // namespace fla
