/* Kernels for the baseline ISA of the target (SSE2 on x86-64): they run on every CPU. */
#include "bn_internal.h"

#define ISA base
#include "bn_kernels_instances.h"
#undef ISA
