/*
 * Internal helpers shared by every kernel instantiation: compiler portability macros, 16-bit
 * float conversions, the work plan (which depends on the shape only, never on the thread count)
 * and the Chan merge of partial statistics.
 */
#ifndef BN_INTERNAL_H
#define BN_INTERNAL_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bn_cy.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(_MSC_VER)
#define BNCY_INLINE static __forceinline
#define BNCY_NOINLINE __declspec(noinline)
#define BNCY_RESTRICT __restrict
#elif defined(__GNUC__) || defined(__clang__)
#define BNCY_INLINE static inline __attribute__((always_inline))
#define BNCY_NOINLINE __attribute__((noinline))
#define BNCY_RESTRICT __restrict__
#else
#define BNCY_INLINE static inline
#define BNCY_NOINLINE
#define BNCY_RESTRICT
#endif

#if defined(__clang__)
/* clang reports each loop its vectorization hints could not vectorize (the 16-bit conversions) */
#pragma clang diagnostic ignored "-Wpass-failed"
#endif

/* Tells the compiler that the iterations of the next loop are independent (no aliasing between
   the arrays it reads and writes), so it vectorizes without runtime overlap checks. */
#if defined(__clang__)
#define BNCY_IVDEP _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define BNCY_IVDEP _Pragma("GCC ivdep")
#elif defined(_MSC_VER)
#define BNCY_IVDEP __pragma(loop(ivdep))
#else
#define BNCY_IVDEP
#endif

/* Keeps the next (short, fixed-count) lane loop rolled, so the loop vectorizer turns it into
   vector operations instead of the loop being unrolled into scalars first. */
#if defined(__clang__)
#define BNCY_LANE_LOOP _Pragma("clang loop unroll(disable)")
#elif defined(__GNUC__)
#define BNCY_LANE_LOOP _Pragma("GCC unroll 1")
#else
#define BNCY_LANE_LOOP
#endif

/* A hint to fetch the cache line at address p + d bytes, to be read soon (no effect on results;
   the address is computed as an integer, so it may lie past the end of the data). */
#if defined(__GNUC__) || defined(__clang__)
#define BNCY_PREFETCH(p, d) __builtin_prefetch((const void *)((uintptr_t)(p) + (uintptr_t)(d)), 0, 3)
#else
#define BNCY_PREFETCH(p, d) ((void)0)
#endif
#ifndef BNCY_PREFETCH_BYTES
#define BNCY_PREFETCH_BYTES 4096 /* how far ahead of a streaming read the hints run */
#endif
#ifndef BNCY_PREFETCH_MIN_BYTES
#define BNCY_PREFETCH_MIN_BYTES (16.0 * 1024 * 1024) /* inputs smaller than this: no hints */
#endif
#ifndef BNCY_LINES_MAX_BYTES
#define BNCY_LINES_MAX_BYTES (2.0 * 1024 * 1024) /* rows statistics on whole lines up to this */
#endif

/* ---- work plan -------------------------------------------------------------------------- */

/* Families of kernels, chosen from the strides of the main input. */
#define BNCY_ROWS 0   /* loop over positions, inner loop over channels (channel stride small) */
#define BNCY_PLANES 1 /* loop over channels, inner loop along the contiguous inner dim */

#define BNCY_CBLOCK_MAX 512     /* channels handled together by one rows unit */
#define BNCY_ROWS_TILE 32768    /* elements in one L2-resident tile (rows) */
#define BNCY_TILE_ROWS_MAX 2048 /* and at most this many rows (the offsets live on the stack) */
#define BNCY_PLANES_TILE 2048   /* positions in one two-pass tile (planes) */
#define BNCY_PLANE_WHOLE_MAX 16384 /* planes up to this long are one tile, and not split
                                      between groups */
#define BNCY_PLANE_SHORT_MAX 1024 /* planes up to this long: statistics tiles of whole planes */
#define BNCY_SHORT_TILE_PLANES 8   /* planes per channel in one such tile */
#define BNCY_SHORT_GROUP_MIN 512   /* and groups of at least this many positions */
#define BNCY_GROUP_ELEMS 32768  /* fewer elements per group than this are not split further */
#define BNCY_TARGET_UNITS 64    /* aim for this many independent units when the work allows */
#define BNCY_PLANE_FEW_GROUPS 8 /* planes statistics with fewer groups split channels too */
#define BNCY_PARALLEL_MIN 32768 /* below this many elements a call runs without a parallel region */
/* rows passes of at most BNCY_LOCAL_CONSTS_MAX channels and BNCY_LOCAL_CONSTS_ROWS or more rows
   per thread compute their constants in every thread */
#define BNCY_LOCAL_CONSTS_MAX 4096
#define BNCY_LOCAL_CONSTS_ROWS 64
#define BNCY_WIDE_ROW_BYTES 2048 /* flat rows this long are walked one at a time */
#define BNCY_ELEM_BLOCK 16384   /* elements per unit of the elementwise passes */
#define BNCY_LANES 8            /* independent accumulators along a plane (fixed summation order) */

typedef struct {
    int family;
    int64_t M;         /* reduced positions per channel: outer * inner */
    int64_t n_groups;  /* contiguous groups of positions per channel, merged in order */
    int64_t group_len; /* positions per group (the last one may be shorter) */
    int64_t cblock;    /* channels per unit */
    int64_t n_cblocks;
    int64_t n_units;   /* n_groups * n_cblocks */
} bncy_plan;

static inline int64_t bncy_cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
static inline int64_t bncy_min64(int64_t a, int64_t b) { return a < b ? a : b; }
static inline int64_t bncy_max64(int64_t a, int64_t b) { return a > b ? a : b; }
static inline int64_t bncy_abs64(int64_t a) { return a < 0 ? -a : a; }

/* The family depends on the layout; everything else only on the sizes. */
static inline int bncy_choose_family(bncy_shape sh, bncy_strides xs) {
    if (sh.inner <= 1) return BNCY_ROWS;
    if (sh.chan <= 1) return BNCY_PLANES;
    if (xs.inner == 1 || xs.inner == 0) return BNCY_PLANES; /* 0: a broadcast run */
    if (xs.chan == 1) return BNCY_ROWS;
    return bncy_abs64(xs.inner) <= bncy_abs64(xs.chan) ? BNCY_PLANES : BNCY_ROWS;
}

static inline bncy_plan bncy_make_plan(bncy_shape sh, bncy_strides xs) {
    bncy_plan p;
    int64_t total, by_work, by_units, cap;
    p.family = bncy_choose_family(sh, xs);
    p.M = sh.outer * sh.inner;
    total = p.M * sh.chan;
    by_work = bncy_max64(1, bncy_cdiv(total, BNCY_GROUP_ELEMS));
    if (p.family == BNCY_ROWS) {
        p.cblock = sh.chan <= BNCY_CBLOCK_MAX ? sh.chan : BNCY_CBLOCK_MAX / 2;
        if (p.cblock < 1) p.cblock = 1;
        p.n_cblocks = bncy_cdiv(sh.chan, p.cblock);
        by_units = bncy_cdiv(BNCY_TARGET_UNITS, p.n_cblocks);
        /* each group keeps >= 128 positions, so the partials stay small next to the input and
           few rows with many channels are not cut into groups whose fixed costs (the shift's
           sample, the merge of partials another thread wrote) outweigh their rows */
        cap = bncy_max64(1, p.M / 128);
        p.n_groups = bncy_max64(1, bncy_min64(bncy_min64(by_work, by_units), cap));
        p.n_units = p.n_groups * p.n_cblocks;
    } else {
        /* a planes unit is a group of positions for every channel */
        p.cblock = sh.chan;
        p.n_cblocks = 1;
        p.n_groups = bncy_max64(1, bncy_min64(bncy_min64(by_work, BNCY_TARGET_UNITS), p.M));
        if (sh.inner > 1 && sh.inner <= BNCY_PLANE_SHORT_MAX) /* fixed costs per plane group */
            p.n_groups = bncy_max64(1, bncy_min64(p.n_groups, p.M / BNCY_SHORT_GROUP_MIN));
        p.n_units = p.n_groups;
    }
    p.group_len = bncy_max64(1, bncy_cdiv(p.M, p.n_groups));
    if (p.family == BNCY_PLANES && sh.inner > 1 && p.group_len < p.M &&
        p.group_len >= sh.inner / 2 && sh.inner <= BNCY_PLANE_WHOLE_MAX) {
        /* groups of whole planes (the length rounded to a multiple of inner): each channel's
           plane is then read in one sequential run, and the planes of consecutive channels
           follow each other in memory */
        p.group_len = bncy_max64(1, (p.group_len + sh.inner / 2) / sh.inner) * sh.inner;
        p.n_groups = bncy_cdiv(p.M, p.group_len);
        p.n_units = p.n_groups;
    }
    if (p.family == BNCY_PLANES && p.n_groups < BNCY_PLANE_FEW_GROUPS && sh.chan > 1) {
        /* few groups of positions (one or two samples of a channels-first input): blocks of
           channels too, so that the threads share the work. Each channel's statistics are
           reduced on their own, whatever block holds the channel, so the results do not
           change. */
        const int64_t want = bncy_min64(by_work, BNCY_TARGET_UNITS);
        const int64_t nb = bncy_min64(sh.chan, bncy_cdiv(want, p.n_groups));
        p.cblock = bncy_cdiv(sh.chan, nb); /* nb >= 1, as want is */
        p.n_cblocks = bncy_cdiv(sh.chan, p.cblock);
        p.n_units = p.n_groups * p.n_cblocks;
    }
    return p;
}

/* An OpenMP pragma from inside a macro (MSVC's __pragma, C99's _Pragma elsewhere). */
#if defined(_OPENMP)
#define BNCY_OMP_PRAGMA(text) BNCY_OMP_PRAGMA_(text)
#if defined(_MSC_VER)
#define BNCY_OMP_PRAGMA_(text) __pragma(text)
#else
#define BNCY_OMP_PRAGMA_(text) _Pragma(#text)
#endif
#endif

/* for (u = 0; u < n; u++) body -- split over nt OpenMP threads (static schedule), or a plain
   loop with no parallel region at all when nt == 1 (a region of one thread still costs). */
#if defined(_OPENMP)
#define BNCY_PARALLEL_FOR(nt, u, n, ...)                                        \
    do {                                                                        \
        if ((nt) > 1) {                                                         \
            BNCY_OMP_PRAGMA(omp parallel for schedule(static) num_threads(nt))  \
            for (u = 0; u < (n); u++) __VA_ARGS__                               \
        } else {                                                                \
            for (u = 0; u < (n); u++) __VA_ARGS__                               \
        }                                                                       \
    } while (0)
#else
#define BNCY_PARALLEL_FOR(nt, u, n, ...)      \
    do {                                      \
        (void)(nt);                           \
        for (u = 0; u < (n); u++) __VA_ARGS__ \
    } while (0)
#endif

/* One parallel region for several passes, with the work split inside it (BNCY_TEAM_FOR,
   BNCY_TEAM_TAIL_FIRST): a pass that needs the previous one complete follows a BNCY_TEAM_FOR,
   which ends at a barrier. nt <= 1 runs the body once, serially, with no region -- unless the
   caller is itself inside an active parallel region: there the body's worksharing would bind to
   the caller's team (each thread's call doing only a share of its own work), so it gets a
   region of its own, of one thread. */
#if defined(_OPENMP)
#define BNCY_TEAM(nt, ...)                                              \
    do {                                                                \
        if ((nt) > 1 || omp_in_parallel()) {                            \
            BNCY_OMP_PRAGMA(omp parallel num_threads(nt)) { __VA_ARGS__ } \
        } else {                                                        \
            __VA_ARGS__                                                 \
        }                                                               \
    } while (0)
/* a loop split statically over the team (or run whole outside a region), then a barrier */
#define BNCY_TEAM_FOR(u, n, ...)                           \
    BNCY_OMP_PRAGMA(omp for schedule(static))              \
    for (u = 0; u < (n); u++) __VA_ARGS__
#define bncy_team_rank() omp_get_thread_num()
#define bncy_team_size() omp_get_num_threads()
#else
#define BNCY_TEAM(nt, ...) \
    do {                   \
        (void)(nt);        \
        __VA_ARGS__        \
    } while (0)
#define BNCY_TEAM_FOR(u, n, ...) for (u = 0; u < (n); u++) __VA_ARGS__
#define bncy_team_rank() 0
#define bncy_team_size() 1
#endif

/* Units [0, n) inside a BNCY_TEAM (no barrier after), split into contiguous ranges, one per
   thread of the team (thread t of s takes [n t / s, n (t + 1) / s)), each walked from its last
   unit to its first. After a pass over the same rows split the same way (the statistics, the
   backward sums), the rows a thread read last are still in its cache, so taking them first
   reads part of the data from there. The body sees its own (private) u. */
#define BNCY_TEAM_TAIL_FIRST(n, ...)                                            \
    do {                                                                        \
        const int64_t bncy_r_ = bncy_team_rank(), bncy_s_ = bncy_team_size();   \
        const int64_t bncy_lo_ = (int64_t)(n) * bncy_r_ / bncy_s_;              \
        int64_t u = (int64_t)(n) * (bncy_r_ + 1) / bncy_s_;                     \
        while (u-- > bncy_lo_) __VA_ARGS__                                      \
    } while (0)

/* How an elementwise pass (normalize, dx) walks its units: flat rows (whole rows shifted by k0:
   aligned, maybe streamed stores, with the constants rotated by k0), rows, planes, or runs of
   short planes walked flat. */
enum { BNCY_WALK_FLAT, BNCY_WALK_ROWS, BNCY_WALK_PLANES, BNCY_WALK_PLANES_FLAT };
typedef struct {
    int mode;   /* BNCY_WALK_* */
    int unit;   /* unit strides along the walked dim */
    int stream; /* streamed (non-temporal) stores */
    int four;   /* flat rows walked four at a time (FN(walk_setup)) */
    int64_t k0, rows, n_units, nb;
} bncy_walk;

/* The planes elementwise passes: units of (o, c, block of BNCY_ELEM_BLOCK along the inner dim),
   or, for inner dims shorter than half a block, runs of whole (o, c) planes. Returns the blocks
   per plane (> 0), or minus the planes per unit (< 0). */
static inline int64_t bncy_plane_blocks(bncy_shape sh) {
    if (sh.inner >= BNCY_ELEM_BLOCK / 2) return bncy_cdiv(sh.inner, BNCY_ELEM_BLOCK);
    return -bncy_max64(1, BNCY_ELEM_BLOCK / bncy_max64(1, sh.inner));
}

static inline int64_t bncy_plane_units(bncy_shape sh, int64_t nb) {
    return nb > 0 ? sh.outer * sh.chan * nb : bncy_cdiv(sh.outer * sh.chan, -nb);
}

static inline int bncy_threads_for(int64_t elements, int n_threads) {
    if (n_threads < 1 || elements < BNCY_PARALLEL_MIN) return 1;
    return n_threads;
}

/* ---- aligned output runs ------------------------------------------------------------------ */

/* The vector loops of the elementwise passes start where the output is aligned to BNCY_ALIGN
   bytes (a cache line, and an AVX-512 vector): an unaligned vector store splits across two
   lines, and a line written whole needs no read first. The element order of the arithmetic is
   unchanged, so the results are too. */
#define BNCY_ALIGN 64
#define BNCY_PEEL_MIN 256 /* runs shorter than this many elements are not peeled */
#ifndef BNCY_STREAM_MIN_BYTES /* outputs of at least this size are written with streaming stores */
#define BNCY_STREAM_MIN_BYTES (64.0 * 1024 * 1024)
#endif

/* Whether an elementwise pass writing out_bytes of output while reading n_in arrays of the same
   size streams its output: where its arrays together exceed half of the last-level cache (they
   could not stay cached for the next pass or layer anyway, and the output's lines would evict
   the inputs still to be read; glibc's memcpy streams copies above a quarter of the cache,
   whose source and destination are then above half of it), or where the output alone is
   BNCY_STREAM_MIN_BYTES or more (the rule where the cache size is unknown). On a 32 MiB L3 the
   backward of an 8 MiB array streams (dy, x and dx: 24 MiB); its normalize (16 MiB) does not.
   The environment variable BN_CY_STREAM_MIN_BYTES (bytes, >= 0), read at the first call,
   replaces both with a plain output-size threshold (the tests set 0 to stream every output). */
static inline int bncy_stream_pass(double out_bytes, int n_in) {
    static int ready = 0;
    static double env_min = -1.0, llc_half = 0.0; /* env_min < 0: the variable is not set */
    if (!ready) {
        env_min = bncy_stream_min_bytes();
        llc_half = 0.5 * bncy_llc_bytes();
        ready = 1;
    }
    if (env_min >= 0.0) return out_bytes >= env_min;
    return out_bytes >= BNCY_STREAM_MIN_BYTES ||
           (llc_half > 0.0 && (double)(n_in + 1) * out_bytes > llc_half);
}

/* Whether the arrays of an elementwise pass, `bytes` together, fill more than a quarter of the
   last-level cache (0 where its size is unknown; bncy_llc_bytes reads cpuid once). */
static inline int bncy_fills_llc_quarter(double bytes) {
    const double llc = bncy_llc_bytes();
    return llc > 0.0 && bytes > 0.25 * llc;
}

/* Elements before p reaches a BNCY_ALIGN boundary (0 when p is not element-aligned), at most n. */
static inline int64_t bncy_peel(const void *p, int64_t elem, int64_t n) {
    const uintptr_t a = (uintptr_t)p;
    int64_t k;
    if (a % (uintptr_t)elem) return 0;
    k = (int64_t)(((BNCY_ALIGN - a % BNCY_ALIGN) % BNCY_ALIGN) / (uintptr_t)elem);
    return k < n ? k : n;
}

/* p rounded up to a BNCY_ALIGN boundary (scratch arrays of constants, allocated with
   BNCY_ALIGN bytes to spare for each: their vector loads then never split a cache line). */
static inline void *bncy_align_up(void *p) {
    const uintptr_t a = (uintptr_t)p;
    return (char *)p + (BNCY_ALIGN - a % BNCY_ALIGN) % BNCY_ALIGN;
}

/* True when positions [0, M) of a rows array are one contiguous run of M * chan elements
   (channel stride 1, rows back to back), so its rows can be walked as a flat array. */
static inline int bncy_flat_rows(bncy_shape sh, bncy_strides s) {
    if (s.chan != 1) return 0;
    if (sh.inner <= 1) return sh.outer <= 1 || s.outer == sh.chan;
    return s.inner == sh.chan && (sh.outer <= 1 || s.outer == sh.inner * sh.chan);
}

/* ---- partial statistics ------------------------------------------------------------------ */

/* Merge partial (wb, mb, m2b) into (wa, ma, m2a): Chan et al.'s pairwise update. */
BNCY_INLINE void bncy_chan_merge(double *wa, double *ma, double *m2a, double wb, double mb,
                                 double m2b) {
    double w, delta;
    if (wb == 0.0) return;
    if (*wa == 0.0) {
        *wa = wb;
        *ma = mb;
        *m2a = m2b;
        return;
    }
    w = *wa + wb;
    delta = mb - *ma;
    *ma += delta * (wb / w);
    *m2a += m2b + delta * delta * (*wa * wb / w);
    *wa = w;
}

/* ---- per-channel formulas shared by the separate and the fused passes ------------------- */

/* mean/var (var holding the sum of squared deviations m2) from a channel's total weight w: the
   variance m2 / w, or NaN for both where the channel has no weight. */
static inline void bncy_finish_moments(double w, double *mean, double *var) {
    if (w > 0.0) {
        *var /= w;
    } else {
        *mean = *var = NAN;
    }
}

/* 1 / sqrt(v) for v in [BNCY_RSQRT_LO, BNCY_RSQRT_HI], to within a few ulps of a double, with
   multiplies and adds only (so a loop of it vectorizes without the slow square-root and divide
   units): the classic estimate from the exponent bits (relative error < 3.5e-2), then four
   Newton steps r <- r (3/2 - v/2 r^2), each squaring the error (2e-3, 5e-6, 3e-11, then the
   rounding: at most 2 ulps from 1 / sqrt(v) over 2e7 values from 1e-100 to 1e100). */
#define BNCY_RSQRT_LO 1e-300
#define BNCY_RSQRT_HI 1e300
static inline int bncy_rsqrt_in_range(double v) { return v >= BNCY_RSQRT_LO && v <= BNCY_RSQRT_HI; }
static inline double bncy_rsqrt_newton(double v) {
    const double h = 0.5 * v;
    uint64_t bits;
    double r;
    memcpy(&bits, &v, sizeof bits);
    bits = UINT64_C(0x5FE6EB50C7B537A9) - (bits >> 1);
    memcpy(&r, &bits, sizeof r);
    r = r * (1.5 - h * (r * r));
    r = r * (1.5 - h * (r * r));
    r = r * (1.5 - h * (r * r));
    r = r * (1.5 - h * (r * r));
    return r;
}

/* dgamma = sum(dy * xhat) = sum(dy * (x - mean)) / sd, sd = sqrt(var + eps). */
static inline double bncy_dgamma(double sdyx, double sd) { return sdyx / sd; }

/* ---- 16-bit floats ----------------------------------------------------------------------- */

BNCY_INLINE float bncy_bits_to_float(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

BNCY_INLINE uint32_t bncy_float_to_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

BNCY_INLINE float bncy_half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exponent = (h >> 10) & 0x1fu;
    uint32_t mantissa = h & 0x3ffu;
    if (exponent == 0x1fu) /* Inf / NaN */
        return bncy_bits_to_float(sign | 0x7f800000u | (mantissa << 13));
    if (exponent == 0) { /* zero / subnormal: mantissa * 2^-24, exact in float */
        float f = (float)mantissa * 5.9604644775390625e-8f;
        return sign ? -f : f;
    }
    return bncy_bits_to_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

/* Round to nearest, ties to even (as NumPy does). */
BNCY_INLINE uint16_t bncy_float_to_half(float f) {
    uint32_t u = bncy_float_to_bits(f);
    uint32_t sign = (u >> 16) & 0x8000u;
    uint32_t a = u & 0x7fffffffu;
    if (a >= 0x47800000u) { /* >= 65536, Inf or NaN */
        if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
        return (uint16_t)(sign | 0x7c00u);
    }
    if (a < 0x38800000u) { /* result is subnormal or zero: let the FPU round at 2^-24 */
        float shifted = bncy_bits_to_float(a) + 0.5f; /* 0.5 = 2^-1: aligns 2^-24 to the ulp */
        return (uint16_t)(sign | (bncy_float_to_bits(shifted) - 0x3f000000u));
    }
    /* normal: rebias exponent, round the 13 dropped bits to nearest even */
    a += 0xc8000fffu + ((a >> 13) & 1u); /* (15 - 127) << 23, plus rounding bias */
    return (uint16_t)(sign | (a >> 13));
}

BNCY_INLINE float bncy_bf16_to_float(uint16_t h) { return bncy_bits_to_float((uint32_t)h << 16); }

BNCY_INLINE uint16_t bncy_float_to_bf16(float f) {
    uint32_t u = bncy_float_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#endif /* BN_INTERNAL_H */
