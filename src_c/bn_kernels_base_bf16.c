/* The bfloat16 kernels of bn_kernels_base.c, in a translation unit of their own, so that a
   parallel build compiles them beside the others (bn_kernels_instances.h). */
#define BNCY_ONLY_BF16 1
#include "bn_kernels_base.c"
