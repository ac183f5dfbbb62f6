// Host interface of the chunk pass on Hopper wgmma: the same ChunkParams and math as
// run_chunk_pass (chunk.h), for DK in {64, 128} and DV a multiple of 64, on sm_90 devices of
// a build with sm_90a code; the scalar-gate mode in chunk_pass_sm90.cuh, GLA mode in
// chunk_pass_gla_sm90.cuh.
#pragma once
#include <cuda_runtime.h>

#include "chunk/chunk.h"

namespace fla {

// Value columns per thread block of the wgmma pass: its dots tensors have DV / 64 tiles.
constexpr int kChunkValueTileSm90 = 64;

template <typename Elem, int DK>
void run_chunk_pass_sm90(const ChunkParams& p, cudaStream_t stream);

// The pass with linear attention's normaliser gradient folded in (ChunkParams::norm_w; no
// gates): the dq and dk passes of chunk_linear_attn(normalize=True)'s backward.
template <typename Elem, int DK>
void run_chunk_pass_sm90_norm(const ChunkParams& p, cudaStream_t stream);

// The forward pass with linear attention's normaliser computed inside it (ChunkParams::norm_den;
// no gates, one walk per sequence): chunk_linear_attn(normalize=True)'s forward.
template <typename Elem, int DK>
void run_chunk_pass_sm90_den(const ChunkParams& p, cudaStream_t stream);

// GLA mode of the pass (chunk_pass_gla_sm90.cuh): same conditions, one block per SM; the
// walks with states_out take the _states launch, those with state_dots the _dots launch.
template <typename Elem, int DK>
void run_chunk_pass_gla_sm90(const ChunkParams& p, cudaStream_t stream);
template <typename Elem, int DK>
void run_chunk_pass_gla_sm90_states(const ChunkParams& p, cudaStream_t stream);
template <typename Elem, int DK>
void run_chunk_pass_gla_sm90_dots(const ChunkParams& p, cudaStream_t stream);

// Whether this build has sm_90a code for the pass (queried once), and how many of its blocks
// fit one SM (passes with dots keep the partner's two stages in shared memory).
template <typename Elem, int DK>
bool chunk_pass_sm90_built();
template <typename Elem, int DK>
int chunk_pass_sm90_blocks_per_sm(bool dots);

}  // namespace fla
