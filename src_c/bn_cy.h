/*
 * bn_cy C API: batch-normalization kernels over NumPy-style strided arrays.
 *
 * Plain C99, no Python. Every array is seen through the canonical view (outer, chan, inner):
 * element (o, c, i) lives at base[o*stride.outer + c*stride.chan + i*stride.inner], strides in
 * elements (may be negative or zero), sizes and strides 64-bit. Statistics reduce over (o, i) for
 * each channel c. A mask, when given, is a C-contiguous (outer, inner) array of non-negative weights
 * in the compute type (float for 16/32-bit data, double for float64 data), or NULL.
 *
 * Per-channel vectors (mean, var, gamma, beta, ...) are double. gamma/beta may be NULL (1 and 0).
 * Results do not depend on n_threads: reduction chunks are fixed by the shape alone and merged in a
 * fixed order.
 *
 * All functions return BNCY_OK or an error code; they never print, abort or call back.
 */
#ifndef BN_CY_H
#define BN_CY_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define BNCY_OK 0
#define BNCY_ERR_NOMEM 1 /* a workspace allocation failed */
#define BNCY_ERR_ARG 2   /* negative size or similar programming error */

typedef struct {
    int64_t outer, chan, inner; /* sizes of the canonical view */
} bncy_shape;

typedef struct {
    int64_t outer, chan, inner; /* strides, in elements */
} bncy_strides;

/* float16 and bfloat16 data are passed as their raw 16-bit patterns. */
typedef uint16_t bncy_half;
typedef uint16_t bncy_bfloat16;

#define BNCY_DECLARE(SFX, T, CT)                                                                    \
    /* Partial statistics (total weight, mean, sum of squared deviations) per channel. */          \
    int bncy_moments_partial_##SFX(const T *x, bncy_strides xs, bncy_shape sh, const CT *mask,    \
                                   double *wsum, double *mean, double *m2sum, int n_threads);     \
    /* Backward in two passes (for synchronized statistics): the per-channel sums, then dx. */    \
    int bncy_grad_sums_##SFX(const T *dy, bncy_strides dys, const T *x, bncy_strides xs,          \
                             bncy_shape sh, const double *mean, double *sdy, double *sdyx,        \
                             int n_threads);                                                      \
    int bncy_grad_input_##SFX(const T *dy, bncy_strides dys, const T *x, bncy_strides xs, T *dx,  \
                              bncy_strides dxs, bncy_shape sh, const CT *mask,                    \
                              const double *mean, const double *var, const double *gamma,         \
                              double eps, int training, double wtotal, const double *sdy,         \
                              const double *sdyx, int n_threads);                                 \
    /* Per-channel weighted mean and population variance (NaN where the weights sum to 0). */    \
    int bncy_moments_##SFX(const T *x, bncy_strides xs, bncy_shape sh, const CT *mask,            \
                           double *mean, double *var, int n_threads);                             \
    /* y = (x - mean) * scale + shift, per channel; y may be x (same strides). */                 \
    int bncy_normalize_##SFX(const T *x, bncy_strides xs, T *y, bncy_strides ys, bncy_shape sh,   \
                             const double *mean, const double *scale, const double *shift,        \
                             int n_threads);                                                      \
    /* Inference: y = gamma * (x - mean) / sqrt(var + eps) + beta. */                             \
    int bncy_batch_norm_##SFX(const T *x, bncy_strides xs, T *y, bncy_strides ys, bncy_shape sh,  \
                              const double *mean, const double *var, const double *gamma,         \
                              const double *beta, double eps, int n_threads);                     \
    /* Training forward: batch statistics (written to mean/var), then normalize into y. */        \
    int bncy_batch_norm_train_##SFX(const T *x, bncy_strides xs, T *y, bncy_strides ys,           \
                                    bncy_shape sh, const CT *mask, const double *gamma,           \
                                    const double *beta, double eps, double *mean, double *var,    \
                                    int n_threads);                                               \
    /* Backward. training != 0: mean/var are the batch statistics of x (with the same mask);     \
       training == 0: they are constants. dgamma = sum(dy*xhat), dbeta = sum(dy). */              \
    int bncy_batch_norm_backward_##SFX(const T *dy, bncy_strides dys, const T *x,                 \
                                       bncy_strides xs, T *dx, bncy_strides dxs, bncy_shape sh,   \
                                       const CT *mask, const double *mean, const double *var,     \
                                       const double *gamma, double eps, int training,             \
                                       double *dgamma, double *dbeta, int n_threads);

BNCY_DECLARE(f32, float, float)
BNCY_DECLARE(f64, double, double)
BNCY_DECLARE(f16, bncy_half, float)
BNCY_DECLARE(bf16, bncy_bfloat16, float)

/* Moving averages, in place: moving = moving * momentum + batch * rest (n values). */
void bncy_ema_f32(float *moving, const float *batch, int64_t n, float momentum, float rest);
void bncy_ema_f64(double *moving, const double *batch, int64_t n, double momentum, double rest);

/* For the tests: `team` threads of one parallel region (a caller's own) each compute the
   moments of x with n_threads into their row of mean/var (team x chan). */
int bncy_moments_in_team_f64(const double *x, bncy_strides xs, bncy_shape sh, double *mean,
                             double *var, int team, int n_threads);

/* Build and runtime facts. */
int bncy_openmp_enabled(void);      /* 1 when compiled with OpenMP */
int bncy_omp_max_threads(void);     /* omp_get_max_threads(), or 1 without OpenMP */
int bncy_num_procs(void);           /* omp_get_num_procs(), or 1 without OpenMP */
const char *bncy_simd_level(void);  /* ISA variant chosen at run time: "avx2+fma" or "baseline" */
const char *bncy_simd_compiled(void); /* comma-separated variants compiled in */
double bncy_llc_bytes(void);         /* one last-level cache in bytes, from cpuid; 0: unknown */
/* The output size from which elementwise passes stream their output, as BN_CY_STREAM_MIN_BYTES
   sets it (a number of bytes >= 0, inf for never, blanks around it allowed), or -1 where it is
   unset, empty or not such a number (the built-in rule then applies). */
double bncy_stream_min_bytes(void);
const char *bncy_compiler(void);    /* compiler name and version */

#ifdef __cplusplus
}
#endif

#endif /* BN_CY_H */
