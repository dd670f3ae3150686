/*
 * Non-temporal ("streaming") stores for the elementwise passes of outputs larger than the caches:
 * a streamed cache line goes to memory without being read first and without evicting the input.
 * Included by bn_kernels_instances.h inside each ISA variant, with BNCY_STREAM_ISA set by the
 * including file: 0 none (portable builds), 1 SSE2 (x86-64 baseline), 2 AVX2, 3 AVX-512. The
 * arithmetic is the scalar code's, operation for operation (no fused multiply-add), so results
 * do not depend on whether a run was streamed. Each function handles the longest prefix of
 * whole vectors and returns its length; the destination must be aligned to BNCY_ALIGN.
 */
#ifndef BNCY_STREAM_ISA
#define BNCY_STREAM_ISA 0
#endif

#if BNCY_STREAM_ISA == 3
#define BNCY_VF __m512
#define BNCY_VD __m512d
#define BNCY_WF 16
#define BNCY_WD 8
#define BNCY_F(op) _mm512_##op##_ps
#define BNCY_D(op) _mm512_##op##_pd
#elif BNCY_STREAM_ISA == 2
#define BNCY_VF __m256
#define BNCY_VD __m256d
#define BNCY_WF 8
#define BNCY_WD 4
#define BNCY_F(op) _mm256_##op##_ps
#define BNCY_D(op) _mm256_##op##_pd
#elif BNCY_STREAM_ISA == 1
#define BNCY_VF __m128
#define BNCY_VD __m128d
#define BNCY_WF 4
#define BNCY_WD 2
#define BNCY_F(op) _mm_##op##_ps
#define BNCY_D(op) _mm_##op##_pd
#endif

#if BNCY_STREAM_ISA > 0
#define BNCY_CAN_STREAM 1

/* y = (x - h) * a + b, per-element constants (a rows run) or one constant set (a plane run). */
#define BNCY_DEFINE_STREAM_AFFINE(SUF, TT, V, W, OP)                                           \
    BNCY_INLINE int64_t bncy_stream_rows_##SUF(TT *y, const TT *x, const TT *h, const TT *a,   \
                                               const TT *b, int64_t n) {                     \
        int64_t i;                                                                             \
        for (i = 0; i + W <= n; i += W) {                                                      \
            V v = OP(sub)(OP(loadu)(x + i), OP(loadu)(h + i));                                 \
            OP(stream)(y + i, OP(add)(OP(mul)(v, OP(loadu)(a + i)), OP(loadu)(b + i)));        \
        }                                                                                      \
        return i;                                                                              \
    }                                                                                          \
    BNCY_INLINE int64_t bncy_stream_plane_##SUF(TT *y, const TT *x, TT h, TT a, TT b,          \
                                                int64_t n) {                                   \
        const V vh = OP(set1)(h), va = OP(set1)(a), vb = OP(set1)(b);                          \
        int64_t i;                                                                             \
        for (i = 0; i + W <= n; i += W)                                                        \
            OP(stream)(y + i, OP(add)(OP(mul)(OP(sub)(OP(loadu)(x + i), vh), va), vb));        \
        return i;                                                                              \
    }

/* dx = A*dy - (B + ((x - hi)*inv)*K) (training, no mask) or A*dy (inference): per-element
   constants (rows) or one set (plane). */
#define BNCY_DEFINE_STREAM_DX(SUF, TT, V, W, OP)                                               \
    BNCY_INLINE int64_t bncy_stream_dx_rows_##SUF(TT *o, const TT *d, const TT *x,             \
                                                  const TT *A, const TT *B, const TT *K,       \
                                                  const TT *inv, const TT *hi, int64_t n,      \
                                                  int training) {                              \
        int64_t i;                                                                             \
        for (i = 0; i + W <= n; i += W) {                                                      \
            V r = OP(mul)(OP(loadu)(A + i), OP(loadu)(d + i));                                 \
            if (training) {                                                                    \
                V e = OP(mul)(OP(sub)(OP(loadu)(x + i), OP(loadu)(hi + i)), OP(loadu)(inv + i)); \
                r = OP(sub)(r, OP(add)(OP(loadu)(B + i), OP(mul)(e, OP(loadu)(K + i))));       \
            }                                                                                  \
            OP(stream)(o + i, r);                                                              \
        }                                                                                      \
        return i;                                                                              \
    }                                                                                          \
    BNCY_INLINE int64_t bncy_stream_dx_plane_##SUF(TT *o, const TT *d, const TT *x, TT A,      \
                                                   TT B, TT K, TT inv, TT hi, int64_t n,       \
                                                   int training) {                             \
        const V va = OP(set1)(A), vb = OP(set1)(B), vk = OP(set1)(K);                          \
        const V vi = OP(set1)(inv), vh = OP(set1)(hi);                                         \
        int64_t i;                                                                             \
        for (i = 0; i + W <= n; i += W) {                                                      \
            V r = OP(mul)(va, OP(loadu)(d + i));                                               \
            if (training) {                                                                    \
                V e = OP(mul)(OP(sub)(OP(loadu)(x + i), vh), vi);                              \
                r = OP(sub)(r, OP(add)(vb, OP(mul)(e, vk)));                                   \
            }                                                                                  \
            OP(stream)(o + i, r);                                                              \
        }                                                                                      \
        return i;                                                                              \
    }

BNCY_DEFINE_STREAM_AFFINE(f32, float, BNCY_VF, BNCY_WF, BNCY_F)
BNCY_DEFINE_STREAM_AFFINE(f64, double, BNCY_VD, BNCY_WD, BNCY_D)
BNCY_DEFINE_STREAM_DX(f32, float, BNCY_VF, BNCY_WF, BNCY_F)
BNCY_DEFINE_STREAM_DX(f64, double, BNCY_VD, BNCY_WD, BNCY_D)

/* Orders the streamed stores before whatever follows (the end of a parallel unit). */
#define BNCY_STREAM_FENCE() _mm_sfence()

#undef BNCY_DEFINE_STREAM_AFFINE
#undef BNCY_DEFINE_STREAM_DX
#else
#define BNCY_CAN_STREAM 0
#define BNCY_STREAM_FENCE() ((void)0)
#endif
