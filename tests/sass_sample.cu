// The kernel behind tests/sass_sample_sm80.sass, the SASS sample tests/test_sass.py parses:
//   nvcc -cubin -arch=sm_80 -O3 -o sass_sample.cubin tests/sass_sample.cu
//   cuobjdump -sass sass_sample.cubin > tests/sass_sample_sm80.sass
// Three nested loops: rows (no tensor instruction of its own) around a k-loop (16-bit global loads,
// shared stores, barriers, an HMMA per step) around a copy loop (no tensor instruction). Its main
// loop is the k-loop: the innermost loop that contains tensor instructions.
#include <cuda_fp16.h>
#include <mma.h>

using namespace nvcuda;

__global__ void sample(const __half* a, const __half* b, float* c, int rows, int k, int copies) {
  __shared__ __align__(32) __half sa[16 * 16], sb[16 * 16];
#pragma unroll 1
  for (int r = 0; r < rows; ++r) {
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
    wmma::fill_fragment(acc, 0.0f);
#pragma unroll 1
    for (int k0 = 0; k0 < k; k0 += 16) {
#pragma unroll 1
      for (int i = threadIdx.x; i < copies; i += blockDim.x) {
        sa[i % 256] = a[(r * 16 + i / 16) * k + k0 + i % 16];
        sb[i % 256] = b[(k0 + i / 16) * 16 + i % 16];
      }
      __syncthreads();
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> fb;
      wmma::load_matrix_sync(fa, sa, 16);
      wmma::load_matrix_sync(fb, sb, 16);
      wmma::mma_sync(acc, fa, fb, acc);
      __syncthreads();
    }
    wmma::store_matrix_sync(c + r * 256, acc, 16, wmma::mem_row_major);
  }
}
