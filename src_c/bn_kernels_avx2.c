/*
 * The same kernels compiled for AVX2 + FMA (x86-64, gcc/clang only). bn_dispatch.c calls them only
 * when the CPU reports both features, so the extension still loads and runs on older CPUs.
 */
#include "bn_internal.h"

#if defined(BNCY_HAVE_AVX2_VARIANT)
#include <immintrin.h>
#define BNCY_STREAM_ISA 2

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#endif

#define BNCY_ISA_FMA 1
#define ISA avx2
#include "bn_kernels_instances.h"
#undef ISA
#undef BNCY_ISA_FMA

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

#else
typedef int bncy_avx2_variant_not_built; /* ISO C forbids an empty translation unit */
#endif
