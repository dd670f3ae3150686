/*
 * Public entry points: pick the ISA variant once (AVX-512 or AVX2+FMA when the CPU has it and it
 * was built, else the baseline), and report build facts. The environment variable BN_CY_SIMD,
 * read at the first call, caps the choice: "baseline", "avx2" (or "avx2+fma"), "avx512"; any
 * other value is ignored. Every variant runs the same algorithm in the same order of operations
 * per channel; results are bitwise identical for any thread count within one variant.
 */
#include <stdio.h>
#include <string.h>

#include "bn_internal.h"

#if (defined(__GNUC__) || defined(__clang__)) && (defined(__x86_64__) || defined(__i386__))
#include <cpuid.h>
#define BNCY_CPUID(leaf, sub, r) __cpuid_count((leaf), (sub), (r)[0], (r)[1], (r)[2], (r)[3])
#define BNCY_HAVE_CPUID 1
#elif defined(_MSC_VER) && (defined(_M_X64) || defined(_M_IX86))
#include <intrin.h>
#define BNCY_CPUID(leaf, sub, r) __cpuidex((int *)(r), (int)(leaf), (int)(sub))
#define BNCY_HAVE_CPUID 1
#else
#define BNCY_HAVE_CPUID 0
#endif

#if defined(BNCY_HAVE_AVX2_VARIANT) && (defined(__GNUC__) || defined(__clang__))
#define BNCY_DISPATCH_AVX2 1
#else
#define BNCY_DISPATCH_AVX2 0
#endif
#if defined(BNCY_HAVE_AVX512_VARIANT) && BNCY_DISPATCH_AVX2
#define BNCY_DISPATCH_AVX512 1
#else
#define BNCY_DISPATCH_AVX512 0
#endif

/* Declarations of the per-ISA instances, generated from the public prototypes. */
#define BNCY_DECLARE_ISA(SFX, ISA, T, CT)                                                         \
    int bncy_moments_partial_##SFX##_##ISA(const T *, bncy_strides, bncy_shape, const CT *,       \
                                           double *, double *, double *, int);                    \
    int bncy_grad_sums_##SFX##_##ISA(const T *, bncy_strides, const T *, bncy_strides,            \
                                     bncy_shape, const double *, double *, double *, int);        \
    int bncy_grad_input_##SFX##_##ISA(const T *, bncy_strides, const T *, bncy_strides, T *,      \
                                      bncy_strides, bncy_shape, const CT *, const double *,       \
                                      const double *, const double *, double, int, double,        \
                                      const double *, const double *, int);                       \
    int bncy_moments_##SFX##_##ISA(const T *, bncy_strides, bncy_shape, const CT *, double *,     \
                                   double *, int);                                                \
    int bncy_normalize_##SFX##_##ISA(const T *, bncy_strides, T *, bncy_strides, bncy_shape,      \
                                     const double *, const double *, const double *, int);        \
    int bncy_batch_norm_##SFX##_##ISA(const T *, bncy_strides, T *, bncy_strides, bncy_shape,     \
                                      const double *, const double *, const double *,             \
                                      const double *, double, int);                               \
    int bncy_batch_norm_train_##SFX##_##ISA(const T *, bncy_strides, T *, bncy_strides,           \
                                            bncy_shape, const CT *, const double *,               \
                                            const double *, double, double *, double *, int);     \
    int bncy_batch_norm_backward_##SFX##_##ISA(const T *, bncy_strides, const T *, bncy_strides,  \
                                               T *, bncy_strides, bncy_shape, const CT *,         \
                                               const double *, const double *, const double *,    \
                                               double, int, double *, double *, int);

#define BNCY_DECLARE_ALL(ISA)                        \
    BNCY_DECLARE_ISA(f32, ISA, float, float)         \
    BNCY_DECLARE_ISA(f64, ISA, double, double)       \
    BNCY_DECLARE_ISA(f16, ISA, bncy_half, float)     \
    BNCY_DECLARE_ISA(bf16, ISA, bncy_bfloat16, float)

BNCY_DECLARE_ALL(base)
#if BNCY_DISPATCH_AVX2
BNCY_DECLARE_ALL(avx2)
#endif
#if BNCY_DISPATCH_AVX512
BNCY_DECLARE_ALL(avx512)
#endif

#define BNCY_ISA_BASE 0
#define BNCY_ISA_AVX2 1
#define BNCY_ISA_AVX512 2

/* The highest variant that was built and that the CPU supports, capped by BN_CY_SIMD. */
static int bncy_detect_isa(void) {
    int level = BNCY_ISA_BASE, cap = BNCY_ISA_AVX512;
    const char *env = getenv("BN_CY_SIMD");
    if (env) {
        if (!strcmp(env, "baseline") || !strcmp(env, "0")) cap = BNCY_ISA_BASE;
        else if (!strcmp(env, "avx2") || !strcmp(env, "avx2+fma")) cap = BNCY_ISA_AVX2;
    }
#if BNCY_DISPATCH_AVX2
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) level = BNCY_ISA_AVX2;
#if BNCY_DISPATCH_AVX512
    if (level == BNCY_ISA_AVX2 && __builtin_cpu_supports("avx512f") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512dq"))
        level = BNCY_ISA_AVX512;
#endif
#endif
    return level < cap ? level : cap;
}

static int bncy_isa(void) {
    static int cached = -1;
    if (cached < 0) cached = bncy_detect_isa();
    return cached;
}

#if BNCY_DISPATCH_AVX512
#define BNCY_CALL(name, SFX, args)                                        \
    (bncy_isa() == BNCY_ISA_AVX512 ? name##_##SFX##_avx512 args           \
     : bncy_isa() == BNCY_ISA_AVX2 ? name##_##SFX##_avx2 args             \
                                   : name##_##SFX##_base args)
#elif BNCY_DISPATCH_AVX2
#define BNCY_CALL(name, SFX, args) \
    (bncy_isa() == BNCY_ISA_AVX2 ? name##_##SFX##_avx2 args : name##_##SFX##_base args)
#else
#define BNCY_CALL(name, SFX, args) (name##_##SFX##_base args)
#endif

#define BNCY_DEFINE(SFX, T, CT)                                                                   \
    int bncy_moments_partial_##SFX(const T *x, bncy_strides xs, bncy_shape sh, const CT *mask,    \
                                   double *wsum, double *mean, double *m2sum, int n_threads) {    \
        return BNCY_CALL(bncy_moments_partial, SFX,                                               \
                         (x, xs, sh, mask, wsum, mean, m2sum, n_threads));                        \
    }                                                                                             \
    int bncy_grad_sums_##SFX(const T *dy, bncy_strides dys, const T *x, bncy_strides xs,          \
                             bncy_shape sh, const double *mean, double *sdy, double *sdyx,        \
                             int n_threads) {                                                     \
        return BNCY_CALL(bncy_grad_sums, SFX, (dy, dys, x, xs, sh, mean, sdy, sdyx, n_threads));  \
    }                                                                                             \
    int bncy_grad_input_##SFX(const T *dy, bncy_strides dys, const T *x, bncy_strides xs, T *dx,  \
                              bncy_strides dxs, bncy_shape sh, const CT *mask,                    \
                              const double *mean, const double *var, const double *gamma,         \
                              double eps, int training, double wtotal, const double *sdy,         \
                              const double *sdyx, int n_threads) {                                \
        return BNCY_CALL(bncy_grad_input, SFX,                                                    \
                         (dy, dys, x, xs, dx, dxs, sh, mask, mean, var, gamma, eps, training,     \
                          wtotal, sdy, sdyx, n_threads));                                         \
    }                                                                                             \
    int bncy_moments_##SFX(const T *x, bncy_strides xs, bncy_shape sh, const CT *mask,            \
                           double *mean, double *var, int n_threads) {                            \
        return BNCY_CALL(bncy_moments, SFX, (x, xs, sh, mask, mean, var, n_threads));             \
    }                                                                                             \
    int bncy_normalize_##SFX(const T *x, bncy_strides xs, T *y, bncy_strides ys, bncy_shape sh,   \
                             const double *mean, const double *scale, const double *shift,        \
                             int n_threads) {                                                     \
        return BNCY_CALL(bncy_normalize, SFX, (x, xs, y, ys, sh, mean, scale, shift, n_threads)); \
    }                                                                                             \
    int bncy_batch_norm_##SFX(const T *x, bncy_strides xs, T *y, bncy_strides ys, bncy_shape sh,  \
                              const double *mean, const double *var, const double *gamma,         \
                              const double *beta, double eps, int n_threads) {                    \
        return BNCY_CALL(bncy_batch_norm, SFX,                                                    \
                         (x, xs, y, ys, sh, mean, var, gamma, beta, eps, n_threads));             \
    }                                                                                             \
    int bncy_batch_norm_train_##SFX(const T *x, bncy_strides xs, T *y, bncy_strides ys,           \
                                    bncy_shape sh, const CT *mask, const double *gamma,           \
                                    const double *beta, double eps, double *mean, double *var,    \
                                    int n_threads) {                                              \
        return BNCY_CALL(bncy_batch_norm_train, SFX,                                              \
                         (x, xs, y, ys, sh, mask, gamma, beta, eps, mean, var, n_threads));       \
    }                                                                                             \
    int bncy_batch_norm_backward_##SFX(const T *dy, bncy_strides dys, const T *x,                 \
                                       bncy_strides xs, T *dx, bncy_strides dxs, bncy_shape sh,   \
                                       const CT *mask, const double *mean, const double *var,     \
                                       const double *gamma, double eps, int training,             \
                                       double *dgamma, double *dbeta, int n_threads) {            \
        return BNCY_CALL(bncy_batch_norm_backward, SFX,                                           \
                         (dy, dys, x, xs, dx, dxs, sh, mask, mean, var, gamma, eps, training,     \
                          dgamma, dbeta, n_threads));                                             \
    }

BNCY_DEFINE(f32, float, float)
BNCY_DEFINE(f64, double, double)
BNCY_DEFINE(f16, bncy_half, float)
BNCY_DEFINE(bf16, bncy_bfloat16, float)

void bncy_ema_f32(float *moving, const float *batch, int64_t n, float momentum, float rest) {
    int64_t i;
    for (i = 0; i < n; i++) moving[i] = moving[i] * momentum + batch[i] * rest;
}

void bncy_ema_f64(double *moving, const double *batch, int64_t n, double momentum,
                  double rest) {
    int64_t i;
    for (i = 0; i < n; i++) moving[i] = moving[i] * momentum + batch[i] * rest;
}

#if BNCY_HAVE_CPUID
/* The largest cache of the highest level described by cpuid's deterministic cache leaf (4 on
   Intel, 0x8000001D on AMD and Hygon: the same layout), in bytes; 0 when the leaf is absent. */
static double bncy_cpuid_cache_leaf(unsigned leaf) {
    unsigned r[4], top;
    double best = 0.0;
    int level = 0, sub;
    BNCY_CPUID(leaf & 0x80000000u, 0, r);
    top = r[0];
    if (top < leaf) return 0.0;
    for (sub = 0; sub < 16; sub++) {
        int type, lv;
        double bytes;
        BNCY_CPUID(leaf, (unsigned)sub, r);
        type = (int)(r[0] & 31u);
        if (type == 0) break; /* no more caches */
        if (type == 2) continue; /* instruction cache */
        lv = (int)((r[0] >> 5) & 7u);
        bytes = (double)((r[1] >> 22) + 1) * (double)(((r[1] >> 12) & 1023u) + 1) *
                (double)((r[1] & 4095u) + 1) * ((double)r[2] + 1.0);
        if (lv > level || (lv == level && bytes > best)) {
            level = lv;
            best = bytes;
        }
    }
    return best;
}
#endif

/* The size of one last-level cache in bytes (shared by the cores under it), from cpuid on x86;
   0 where unknown. Read once. */
double bncy_llc_bytes(void) {
    static double cached = -1.0;
    if (cached < 0.0) {
        double v = 0.0;
#if BNCY_HAVE_CPUID
        v = bncy_cpuid_cache_leaf(4u);
        if (v <= 0.0) v = bncy_cpuid_cache_leaf(0x8000001Du);
#endif
        cached = v;
    }
    return cached;
}

double bncy_stream_min_bytes(void) {
    const char *e = getenv("BN_CY_STREAM_MIN_BYTES");
    char *end;
    double v;
    if (!e) return -1.0;
    v = strtod(e, &end);
    if (end == e) return -1.0; /* empty, blank or not a number */
    while (*end == ' ' || *end == '\t' || *end == '\n' || *end == '\r') end++;
    if (*end != '\0' || !(v >= 0.0)) return -1.0; /* negative or NaN (inf: never stream) */
    return v;
}

/* Each thread of a team of `team` threads, in a parallel region opened here as a caller's own
   would be, computes the moments of the whole x with n_threads into its own rows t of mean and
   var (team x chan each). For the tests: a kernel called from inside a caller's team must do
   all of its own work, as when called alone. Returns the first error of any thread. */
int bncy_moments_in_team_f64(const double *x, bncy_strides xs, bncy_shape sh, double *mean,
                             double *var, int team, int n_threads) {
    int status = BNCY_OK, t;
    if (team < 1 || sh.chan < 0) return BNCY_ERR_ARG;
#ifdef _OPENMP
#pragma omp parallel for schedule(static, 1) num_threads(team)
#endif
    for (t = 0; t < team; t++) {
        const int s = bncy_moments_f64(x, xs, sh, NULL, mean + (int64_t)t * sh.chan,
                                       var + (int64_t)t * sh.chan, n_threads);
        if (s != BNCY_OK) {
#ifdef _OPENMP
#pragma omp critical(bncy_team_status)
#endif
            if (status == BNCY_OK) status = s;
        }
    }
    return status;
}

int bncy_openmp_enabled(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

int bncy_omp_max_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

int bncy_num_procs(void) {
#ifdef _OPENMP
    return omp_get_num_procs();
#else
    return 1;
#endif
}

const char *bncy_simd_level(void) {
    switch (bncy_isa()) {
    case BNCY_ISA_AVX512: return "avx512";
    case BNCY_ISA_AVX2: return "avx2+fma";
    default: return "baseline";
    }
}

const char *bncy_simd_compiled(void) {
#if BNCY_DISPATCH_AVX512
    return "baseline,avx2+fma,avx512";
#elif BNCY_DISPATCH_AVX2
    return "baseline,avx2+fma";
#else
    return "baseline";
#endif
}

#ifndef BNCY_COMPILER_TYPE
#define BNCY_COMPILER_TYPE "unknown"
#endif

const char *bncy_compiler(void) {
    static char text[128];
    if (!text[0]) {
#if defined(__clang__)
        snprintf(text, sizeof text, "clang %d.%d.%d (%s)", __clang_major__, __clang_minor__,
                 __clang_patchlevel__, BNCY_COMPILER_TYPE);
#elif defined(__GNUC__)
        snprintf(text, sizeof text, "gcc %d.%d.%d (%s)", __GNUC__, __GNUC_MINOR__,
                 __GNUC_PATCHLEVEL__, BNCY_COMPILER_TYPE);
#elif defined(_MSC_VER)
        snprintf(text, sizeof text, "msvc %d (%s)", _MSC_VER, BNCY_COMPILER_TYPE);
#else
        snprintf(text, sizeof text, "%s", BNCY_COMPILER_TYPE);
#endif
    }
    return text;
}
