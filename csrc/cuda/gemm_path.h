// How ops_cuda.cpp's gradient GEMMs (G @ y, G.T @ x) take a 16-bit G block, chosen from the torch
// version the glue is compiled against. One place for the choice: ops_cuda.cpp follows it and
// module.cpp reports it (build_info()["cuda_gemm"], fastcl.info()).
//
//   FASTCL_MM_OUT_DTYPE 1, "out_dtype": at::mm(a, b, out_dtype) (torch >= 2.8), 16-bit G times 16-bit
//     features with a float32 result, accumulated in float32 by cuBLAS.
//   FASTCL_MM_OUT_DTYPE 0, "widened": both operands widened to float32 per block (float32 GEMMs and
//     a block-sized float32 copy of G): correct, slower. Older torch, and the host execution
//     (FASTCL_HOST_EXEC, csrc/cuda/host), which runs the glue on CPU tensors, where ATen has no mm
//     with out_dtype (there the widening is exact).
//
// Torch-free like every csrc/cuda/*.h: the includer includes <torch/version.h> first. That header
// exists in every torch fastcl supports (>= 2.4); <torch/headeronly/version.h> appeared in 2.10
// (pytorch#164381), and reading the version through it alone silently widened every block under
// torch 2.8 and 2.9.
#pragma once

#ifndef TORCH_VERSION_MAJOR
#error "include <torch/version.h> before gemm_path.h: the G GEMM path depends on torch's version"
#endif

#if !defined(FASTCL_HOST_EXEC) && \
    (TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 8))
#define FASTCL_MM_OUT_DTYPE 1
#define FASTCL_CUDA_GEMM "out_dtype"
#else
#define FASTCL_MM_OUT_DTYPE 0
#define FASTCL_CUDA_GEMM "widened"
#endif
