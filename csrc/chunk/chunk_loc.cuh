// Grid slots of per-chunk kernels (gla.h, the gate gradient): slot -> (sequence, chunk).
#pragma once
#include <cstdint>

#include "chunk/chunk.h"

namespace fla {
namespace chunk {

// The chunk held by grid slot `slot` (gla.h): its sequence n, the sequence's first token and
// length, and the chunk's index c in the sequence; false for slots past the last chunk of a
// packed batch.
struct ChunkLoc {
  int64_t bos, len, c;
  int n;
};
__device__ __forceinline__ bool locate_chunk(int slot, const int64_t* cu_seqlens, const int64_t* chunk_offsets,
                                             int N, int T, ChunkLoc& loc) {
  if (cu_seqlens != nullptr) {   // the sequence holding this slot: chunk_offsets[n] <= slot < [n + 1]
    if (slot >= chunk_offsets[N]) return false;
    int lo = 0, hi = N;
    while (hi - lo > 1) {
      const int mid = (lo + hi) / 2;
      if (chunk_offsets[mid] <= slot) lo = mid; else hi = mid;
    }
    loc.n = lo;
    loc.bos = cu_seqlens[lo];
    loc.len = cu_seqlens[lo + 1] - loc.bos;
    loc.c = slot - chunk_offsets[lo];
  } else {
    const int64_t chunks = (T + kChunk - 1) / kChunk;
    loc.n = int(slot / chunks);
    loc.bos = int64_t(loc.n) * T;
    loc.len = T;
    loc.c = slot % chunks;
  }
  return true;
}

}  // namespace chunk
}  // namespace fla
