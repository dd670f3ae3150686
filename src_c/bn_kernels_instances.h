/*
 * Instantiates bn_kernels_template.h for every dtype. Included once per ISA variant, with ISA
 * defined (base, avx2, avx512). One algorithm source, four dtypes. STREAM_* are
 * the streaming-store runs of bn_stream.h for the dtypes that have them (0 elements otherwise).
 *
 * Each variant is three translation units, which a parallel build compiles at once (17 - 28 s
 * each with gcc -O3): the variant's file instantiates float32 and float64, and its *_f16.c and
 * *_bf16.c files, which define BNCY_ONLY_F16 or BNCY_ONLY_BF16 and include it, the one dtype.
 */
#include "bn_stream.h"

/* MULADD_F / MULADD_D (a * b + c in float / double): one fused multiply-add where the variant has
   the instruction (BNCY_ISA_FMA, defined by the AVX2 and AVX-512 translation units), else a
   multiply and an add. Each variant's results stay its own for any thread count. */
#if defined(BNCY_ISA_FMA) && (defined(__GNUC__) || defined(__clang__))
#define MULADD_F(a, b, c) __builtin_fmaf(a, b, c)
#define MULADD_D(a, b, c) __builtin_fma(a, b, c)
#else
#define MULADD_F(a, b, c) ((a) * (b) + (c))
#define MULADD_D(a, b, c) ((a) * (b) + (c))
#endif

#if !defined(BNCY_ONLY_F16) && !defined(BNCY_ONLY_BF16)
#define T float
#define CT float
#define MULADD MULADD_F
#define SFX f32
#define LOAD(p) (*(p))
#define STORE(p, v) (*(p) = (v))
#if BNCY_CAN_STREAM
#define STREAMS 1
#define STREAM_ROWS(y, x, h, a, b, n) bncy_stream_rows_f32(y, x, h, a, b, n)
#define STREAM_PLANE(y, x, h, a, b, n) bncy_stream_plane_f32(y, x, h, a, b, n)
#define STREAM_DX_ROWS(o, d, x, A, B, K, v, h, n, t) bncy_stream_dx_rows_f32(o, d, x, A, B, K, v, h, n, t)
#define STREAM_DX_PLANE(o, d, x, A, B, K, v, h, n, t) bncy_stream_dx_plane_f32(o, d, x, A, B, K, v, h, n, t)
#endif
#include "bn_kernels_template.h"
#undef T
#undef CT
#undef SFX
#undef LOAD
#undef STORE
#undef MULADD
#undef STREAMS
#undef STREAM_ROWS
#undef STREAM_PLANE
#undef STREAM_DX_ROWS
#undef STREAM_DX_PLANE

#define T double
#define CT double
#define MULADD MULADD_D
#define SFX f64
#define LOAD(p) (*(p))
#define STORE(p, v) (*(p) = (v))
#if BNCY_CAN_STREAM
#define STREAMS 1
#define STREAM_ROWS(y, x, h, a, b, n) bncy_stream_rows_f64(y, x, h, a, b, n)
#define STREAM_PLANE(y, x, h, a, b, n) bncy_stream_plane_f64(y, x, h, a, b, n)
#define STREAM_DX_ROWS(o, d, x, A, B, K, v, h, n, t) bncy_stream_dx_rows_f64(o, d, x, A, B, K, v, h, n, t)
#define STREAM_DX_PLANE(o, d, x, A, B, K, v, h, n, t) bncy_stream_dx_plane_f64(o, d, x, A, B, K, v, h, n, t)
#endif
#include "bn_kernels_template.h"
#undef T
#undef CT
#undef SFX
#undef LOAD
#undef STORE
#undef MULADD
#undef STREAMS
#undef STREAM_ROWS
#undef STREAM_PLANE
#undef STREAM_DX_ROWS
#undef STREAM_DX_PLANE

#endif

#ifdef BNCY_ONLY_F16
#define T bncy_half
#define CT float
#define MULADD MULADD_F
#define SFX f16
#define LOAD(p) bncy_half_to_float(*(p))
#define STORE(p, v) (*(p) = bncy_float_to_half(v))
#include "bn_kernels_template.h"
#undef T
#undef CT
#undef SFX
#undef LOAD
#undef STORE
#undef MULADD

#endif

#ifdef BNCY_ONLY_BF16
#define T bncy_bfloat16
#define CT float
#define MULADD MULADD_F
#define SFX bf16
#define LOAD(p) bncy_bf16_to_float(*(p))
#define STORE(p, v) (*(p) = bncy_float_to_bf16(v))
#include "bn_kernels_template.h"
#undef T
#undef CT
#undef SFX
#undef LOAD
#undef STORE
#undef MULADD
#endif
