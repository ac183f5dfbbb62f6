// Grids with one slot per chunk of C rows (the normaliser, the gate gradient): the slots of
// one sequence.
#pragma once
#include <cstdint>

namespace fla {

// Slots [c0, c1) of sequence n: from chunk_offsets with cu_seqlens (packed sequences), else
// ceil(T / C) per sequence of a dense batch.
template <int C>
__device__ __forceinline__ void sequence_slots(int n, const int64_t* cu_seqlens, const int64_t* chunk_offsets, int T,
                                               int64_t& c0, int64_t& c1) {
  if (cu_seqlens != nullptr) {
    c0 = chunk_offsets[n];
    c1 = chunk_offsets[n + 1];
  } else {
    const int64_t per_seq = (int64_t(T) + C - 1) / C;
    c0 = n * per_seq;
    c1 = c0 + per_seq;
  }
}

}  // namespace fla
