// The normalisation kernels for every input dtype (small kernels: one translation unit).
#include "normalize/normalize_kernel.cuh"

namespace fla {
template void run_normalize_fwd<__half>(const NormalizeParams&, cudaStream_t);
template void run_normalize_fwd<__nv_bfloat16>(const NormalizeParams&, cudaStream_t);
template void run_normalize_fwd<float>(const NormalizeParams&, cudaStream_t);
template void run_normalize_bwd<__half>(const NormalizeParams&, cudaStream_t);
template void run_normalize_bwd<__nv_bfloat16>(const NormalizeParams&, cudaStream_t);
template void run_normalize_bwd<float>(const NormalizeParams&, cudaStream_t);
}  // namespace fla
