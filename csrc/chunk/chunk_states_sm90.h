// Host interface of the state-only launch of split scalar-gate walks on Hopper
// (chunk_states_sm90.cuh) and of the fold of its pieces (seg_fold.cu); the split: chunk.h.
#pragma once
#include <cuda_runtime.h>

#include "chunk/chunk.h"

namespace fla {

// The state-only launch of a split scalar-gate walk (chunk_states_sm90.cuh): every segment
// but the last is cut into `parts` pieces of part_chunks chunks, and each piece's local state
// (from zero) and total log2 gate are written; run_chunk_seg_fold folds the pieces of each
// segment, in order, into the pass's seg_states / seg_gates.
struct SegStateParams {
  ChunkParams pass;     // the full pass's params (num_segs >= 2, seg_chunks)
  int parts, part_chunks;
  float* part_states;   // [N * num_segs * parts, H, DK, DV] (the last segment's slots unused)
  float* part_gates;    // [N * num_segs * parts, H]
};

template <typename Elem, int DK>
void run_chunk_states_sm90(const SegStateParams& sp, cudaStream_t stream);
template <typename Elem, int DK>
int chunk_states_sm90_blocks_per_sm();

// seg_states[n, s] = the pieces of segment s folded in order,
//   U <- exp2(gate_j) U + U_j,   seg_gates[n, s] = sum_j gate_j,
// for s < num_segs - 1 (layouts as SegStateParams and ChunkParams::seg_states).
struct SegFoldParams {
  const float* part_states;
  const float* part_gates;
  float* seg_states;
  float* seg_gates;
  int N, H, num_segs, parts;
  int64_t state_elems;   // DK * DV, a multiple of 4
};

void run_chunk_seg_fold(const SegFoldParams& f, cudaStream_t stream);

}  // namespace fla
