/*
 * Instantiates bn_kernels_template.h for every dtype. Included once per ISA variant, with ISA
 * defined (base, avx2). One algorithm source, four dtypes.
 */
#define T float
#define CT float
#define SFX f32
#define LOAD(p) (*(p))
#define STORE(p, v) (*(p) = (v))
#include "bn_kernels_template.h"
#undef T
#undef CT
#undef SFX
#undef LOAD
#undef STORE

#define T double
#define CT double
#define SFX f64
#define LOAD(p) (*(p))
#define STORE(p, v) (*(p) = (v))
#include "bn_kernels_template.h"
#undef T
#undef CT
#undef SFX
#undef LOAD
#undef STORE

#define T bncy_half
#define CT float
#define SFX f16
#define LOAD(p) bncy_half_to_float(*(p))
#define STORE(p, v) (*(p) = bncy_float_to_half(v))
#include "bn_kernels_template.h"
#undef T
#undef CT
#undef SFX
#undef LOAD
#undef STORE

#define T bncy_bfloat16
#define CT float
#define SFX bf16
#define LOAD(p) bncy_bf16_to_float(*(p))
#define STORE(p, v) (*(p) = bncy_float_to_bf16(v))
#include "bn_kernels_template.h"
#undef T
#undef CT
#undef SFX
#undef LOAD
#undef STORE
