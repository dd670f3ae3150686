/*
 * The same kernels compiled for AVX-512 (F, VL, BW, DQ) with 512-bit vectors preferred
 * (x86-64, gcc/clang only). bn_dispatch.c calls them only when the CPU and the OS support
 * AVX-512, so the extension still loads and runs everywhere else.
 */
#include "bn_internal.h"

#if defined(BNCY_HAVE_AVX512_VARIANT)
#include <immintrin.h>
#define BNCY_STREAM_ISA 3

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma"), \
                                            min_vector_width(512))),                             \
                             apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,prefer-vector-width=512")
#endif

#define BNCY_ISA_FMA 1
#define ISA avx512
#include "bn_kernels_instances.h"
#undef ISA
#undef BNCY_ISA_FMA

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

#else
typedef int bncy_avx512_variant_not_built; /* ISO C forbids an empty translation unit */
#endif
