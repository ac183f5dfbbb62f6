// The normalisation kernels for every input dtype (small kernels: one translation unit).
#include "normalize/normalize_kernel.cuh"

namespace fla {
template void run_normalize_fwd<__half>(const NormalizeParams&, cudaStream_t);
template void run_normalize_fwd<__nv_bfloat16>(const NormalizeParams&, cudaStream_t);
template void run_normalize_fwd<float>(const NormalizeParams&, cudaStream_t);
template void run_normalize_bwd_dots<__half>(const NormalizeParams&, cudaStream_t);
template void run_normalize_bwd_grads<__half>(const NormalizeParams&, cudaStream_t);
template void run_normalize_bwd_dots<__nv_bfloat16>(const NormalizeParams&, cudaStream_t);
template void run_normalize_bwd_grads<__nv_bfloat16>(const NormalizeParams&, cudaStream_t);
template void run_normalize_bwd_dots<float>(const NormalizeParams&, cudaStream_t);
template void run_normalize_bwd_grads<float>(const NormalizeParams&, cudaStream_t);
}  // namespace fla
