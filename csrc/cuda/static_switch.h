// Runtime value -> template argument, flash-attention style: the body sees a compile-time name.
#pragma once

#include "launch.h"

#define FASTCL_DTYPE_SWITCH(DTYPE, NAME, ...)                   \
  [&] {                                                         \
    switch (DTYPE) {                                            \
      case ::fastcl::cuda::DType::kFloat16: {                   \
        using NAME = __half;                                    \
        return __VA_ARGS__();                                   \
      }                                                         \
      case ::fastcl::cuda::DType::kBFloat16: {                  \
        using NAME = __nv_bfloat16;                             \
        return __VA_ARGS__();                                   \
      }                                                         \
      default: {                                                \
        using NAME = float;                                     \
        return __VA_ARGS__();                                   \
      }                                                         \
    }                                                           \
  }()

#define FASTCL_KIND_SWITCH(KIND, NAME, ...)                            \
  [&] {                                                                \
    switch (KIND) {                                                    \
      case ::fastcl::cuda::GradKind::kSigLip: {                        \
        constexpr auto NAME = ::fastcl::cuda::GradKind::kSigLip;       \
        return __VA_ARGS__();                                          \
      }                                                                \
      case ::fastcl::cuda::GradKind::kMW: {                            \
        constexpr auto NAME = ::fastcl::cuda::GradKind::kMW;           \
        return __VA_ARGS__();                                          \
      }                                                                \
      default: {                                                       \
        constexpr auto NAME = ::fastcl::cuda::GradKind::kLse;          \
        return __VA_ARGS__();                                          \
      }                                                                \
    }                                                                  \
  }()
