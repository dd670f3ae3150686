/* Kernels for the baseline ISA of the target (SSE2 on x86-64): they run on every CPU. */
#include "bn_internal.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#define BNCY_STREAM_ISA 1
#endif

#define ISA base
#include "bn_kernels_instances.h"
#undef ISA
