/*
 * Batch-normalization kernels, written once and instantiated per dtype and per ISA variant.
 *
 * Included by bn_kernels_base.c / bn_kernels_avx2.c once per dtype, with these macros defined:
 *   T            storage type of the data (float, double, or uint16_t for float16/bfloat16)
 *   CT           compute type (float for 16/32-bit data, double for float64)
 *   SFX          dtype suffix token (f32, f64, f16, bf16)
 *   ISA          ISA variant token (base, avx2)
 *   LOAD(p)      read *p as CT
 *   STORE(p, v)  write CT v to *p, rounding once
 *
 * Statistics (DESIGN.md section 3): each channel's positions are split into groups fixed by the
 * shape (bncy_make_plan), each group into cache-resident tiles. A tile is reduced by two passes
 * (sum, then centered sums of squares, both in double) and merged into its group with Chan's
 * formula; groups are merged in order. No step depends on the number of threads, so results are
 * bitwise identical for any thread count.
 */

#ifndef STREAMS /* this dtype or ISA has no streaming stores (bn_stream.h) */
#define STREAM_ROWS(y, x, h, a, b, n) ((int64_t)0)
#define STREAM_PLANE(y, x, h, a, b, n) ((int64_t)0)
#define STREAM_DX_ROWS(o, d, x, A, B, K, v, h, n, t) ((int64_t)0)
#define STREAM_DX_PLANE(o, d, x, A, B, K, v, h, n, t) ((int64_t)0)
#define BNCY_T_STREAMS 0
#else
#define BNCY_T_STREAMS 1
#endif

#define BNCY_CAT3_(a, b, c) a##_##b##_##c
#define BNCY_CAT3(a, b, c) BNCY_CAT3_(a, b, c)
#define FN(name) BNCY_CAT3(name, SFX, ISA)

/* Walks positions p = o*inner + i of the (outer, inner) grid in order, tracking the offset. */
typedef struct {
    int64_t o, i, off;
} FN(bncy_pos);

BNCY_INLINE FN(bncy_pos) FN(pos_at)(int64_t p, bncy_shape sh, bncy_strides s) {
    FN(bncy_pos) q;
    q.o = p / sh.inner;
    q.i = p - q.o * sh.inner;
    q.off = q.o * s.outer + q.i * s.inner;
    return q;
}

BNCY_INLINE void FN(pos_next)(FN(bncy_pos) *q, bncy_shape sh, bncy_strides s) {
    if (++q->i == sh.inner) {
        q->i = 0;
        q->o++;
        q->off = q->o * s.outer;
    } else {
        q->off += s.inner;
    }
}

/* ---------------------------------------------------------------------------------------------
 * Statistics, rows family: a unit is (group of positions, block of channels); the inner loop runs
 * across channels, so the compiler vectorizes across channels with no reassociation.
 * ------------------------------------------------------------------------------------------- */
/* Two-pass statistics of one tile. Channels run innermost (vectorized across channels); rows
   go four at a time, combined in the compute type (a sum of four, correct to ~2 ulps) and then
   added into double accumulators, so the arithmetic is mostly single precision while the
   accumulation is double. The tile is small enough to stay in L1/L2: the second pass does not
   touch memory. Rows are given by their offsets (and weights, with a mask). */
static BNCY_NOINLINE void FN(rows_tile_sum)(double *BNCY_RESTRICT s, const T *BNCY_RESTRICT xc,
                                            int64_t sc, const int64_t *BNCY_RESTRICT offs,
                                            const double *BNCY_RESTRICT wr, int64_t nr,
                                            int64_t nc) {
    int64_t r = 0, c;
    if (!wr && sc == 1) {
        /* the first rows add into 0.0 (as into zeroed sums), with no zeroing pass */
        for (; r + 4 <= nr; r += 4) {
            const T *BNCY_RESTRICT x0 = xc + offs[r], *BNCY_RESTRICT x1 = xc + offs[r + 1];
            const T *BNCY_RESTRICT x2 = xc + offs[r + 2], *BNCY_RESTRICT x3 = xc + offs[r + 3];
            BNCY_IVDEP for (c = 0; c < nc; c++)
                s[c] = (r ? s[c] : 0.0) +
                       (double)((LOAD(x0 + c) + LOAD(x1 + c)) + (LOAD(x2 + c) + LOAD(x3 + c)));
        }
    }
    if (r == 0)
        for (c = 0; c < nc; c++) s[c] = 0.0;
    for (; r < nr; r++) {
        const T *BNCY_RESTRICT x0 = xc + offs[r];
        const double w = wr ? wr[r] : 1.0;
        for (c = 0; c < nc; c++) s[c] += w * (double)LOAD(x0 + c * sc);
    }
}

/* Exact (double) weighted mean of one channel of a tile: the shift of the fallback pass. */
static double FN(rows_tile_mean_exact)(const T *xc, const int64_t *offs, const double *wr,
                                       int64_t nr, double wt) {
    double s = 0.0;
    int64_t r;
    for (r = 0; r < nr; r++) s += (wr ? wr[r] : 1.0) * (double)LOAD(xc + offs[r]);
    return s / wt;
}

/* Exact (double) centered sums of one channel of a tile: the fallback when compute-type squares
   overflowed (|x - mean| beyond ~1e19 in float32). */
static void FN(rows_tile_dev_exact)(double *s1, double *s2, double mt, const T *xc,
                                    const int64_t *offs, const double *wr, int64_t nr) {
    double a = 0.0, b = 0.0;
    int64_t r;
    for (r = 0; r < nr; r++) {
        const double w = wr ? wr[r] : 1.0, d = (double)LOAD(xc + offs[r]) - mt;
        a += w * d;
        b += (w * d) * d;
    }
    *s1 = a;
    *s2 = b;
}

static BNCY_NOINLINE void FN(rows_tile_dev)(double *BNCY_RESTRICT s1, double *BNCY_RESTRICT s2,
                                            const CT *BNCY_RESTRICT mt,
                                            const T *BNCY_RESTRICT xc, int64_t sc,
                                            const int64_t *BNCY_RESTRICT offs,
                                            const double *BNCY_RESTRICT wr, int64_t nr,
                                            int64_t nc, int pf) {
    int64_t r = 0, c, k;
    if (!wr && sc == 1) {
        /* eight rows at a time: their deviations and squares summed as a balanced tree in the
           compute type (three roundings), then added into the double accumulators; the hints
           fetch the memory after these rows (the next rows, when the tile is contiguous) */
        const int64_t pf_bytes = pf ? 8 * nc * (int64_t)sizeof(T) : 0;
        for (; r + 8 <= nr; r += 8) {
            const T *BNCY_RESTRICT x0 = xc + offs[r], *BNCY_RESTRICT x1 = xc + offs[r + 1];
            const T *BNCY_RESTRICT x2 = xc + offs[r + 2], *BNCY_RESTRICT x3 = xc + offs[r + 3];
            const T *BNCY_RESTRICT x4 = xc + offs[r + 4], *BNCY_RESTRICT x5 = xc + offs[r + 5];
            const T *BNCY_RESTRICT x6 = xc + offs[r + 6], *BNCY_RESTRICT x7 = xc + offs[r + 7];
            for (k = 0; k < pf_bytes; k += 64) BNCY_PREFETCH(x0, BNCY_PREFETCH_BYTES + k);
            BNCY_IVDEP for (c = 0; c < nc; c++) {
                const CT m = mt[c];
                const CT d0 = LOAD(x0 + c) - m, d1 = LOAD(x1 + c) - m;
                const CT d2 = LOAD(x2 + c) - m, d3 = LOAD(x3 + c) - m;
                const CT d4 = LOAD(x4 + c) - m, d5 = LOAD(x5 + c) - m;
                const CT d6 = LOAD(x6 + c) - m, d7 = LOAD(x7 + c) - m;
                /* the first rows add into 0.0 (as into zeroed sums), with no zeroing pass */
                s1[c] = (r ? s1[c] : 0.0) +
                        (double)(((d0 + d1) + (d2 + d3)) + ((d4 + d5) + (d6 + d7)));
                CT q = d0 * d0;
                q = MULADD(d1, d1, q);
                q = MULADD(d2, d2, q);
                q = MULADD(d3, d3, q);
                q = MULADD(d4, d4, q);
                q = MULADD(d5, d5, q);
                q = MULADD(d6, d6, q);
                q = MULADD(d7, d7, q);
                s2[c] = (r ? s2[c] : 0.0) + (double)q;
            }
        }
    }
    if (r == 0)
        for (c = 0; c < nc; c++) s1[c] = s2[c] = 0.0;
    for (; r < nr; r++) {
        const T *BNCY_RESTRICT x0 = xc + offs[r];
        const double w = wr ? wr[r] : 1.0;
        for (c = 0; c < nc; c++) {
            const double d = (double)(LOAD(x0 + c * sc) - mt[c]);
            s1[c] += w * d;
            s2[c] += (w * d) * d;
        }
    }
}

/* Where the statistics of a rows unit split its channels so that the wide loop loads whole lines:
   the number of leading channels before the first aligned element, when every row of the unit
   sits at the same place in its line (contiguous channels, no mask, line-multiple row strides);
   -1 where they do not. A vector load that straddles two lines costs about twice one that does
   not: on the first machine, a stand-alone copy of the loop of rows_tile_dev over (128, 1024)
   float32 rows took 9.6 us from a base 16 bytes into a line and 6.9 us from an aligned one
   (numpy's large arrays start 16 bytes into a page). The split computes up to two vectors of
   each row twice and walks the rows three times; it pays where the input is read from the core's
   own cache (BNCY_LINES_MAX_BYTES) and the unit has 16 vectors or more. Measured side by side,
   2 threads, float32, best of 7 x 3000 calls from Python: moments of (256, 1024) (1 MB) 18.0-19.4
   -> 16.6-18.8 us; of (64, 128, 256) (8 MB, from the shared cache) 166-169 -> 178-183 us, and of
   NHWC (32, 56, 56, 64), four vectors a unit, 0.41 -> 0.53 ms: there it is not used. Each channel's sums are computed alone, by the
   same code, so the split does not change them. */
static int64_t FN(rows_head)(const T *xc, bncy_strides xs, bncy_shape sh, int masked,
                             int64_t nc) {
    const uintptr_t mis = (uintptr_t)xc % BNCY_ALIGN;
    const int64_t vw = (int64_t)(BNCY_ALIGN / sizeof(CT)); /* a vector of the sums */
    if (masked || xs.chan != 1 || nc < 16 * vw || mis % sizeof(T) != 0) return -1;
    if ((double)sh.outer * (double)sh.inner * (double)sh.chan * sizeof(T) > BNCY_LINES_MAX_BYTES)
        return -1;
    if ((xs.outer * (int64_t)sizeof(T)) % BNCY_ALIGN != 0) return -1;
    if (sh.inner > 1 && (xs.inner * (int64_t)sizeof(T)) % BNCY_ALIGN != 0) return -1;
    return (int64_t)((BNCY_ALIGN - mis) % BNCY_ALIGN / sizeof(T));
}

/* How far past an aligned address an array of elements of this size starts so that its element
   head is aligned. */
static inline int64_t FN(lag)(int64_t head, size_t size) {
    const int64_t n = (int64_t)(BNCY_ALIGN / size);
    return (n - head % n) % n;
}

/* Chan-merge a tile's partials (weight wt, shift mt, centered sums s1, s2) into the group's
   running (gmean, gm2) of weight wgroup. The weights are the same for every channel, so the merge
   factors are scalars and the loop vectorizes across channels. */
static BNCY_NOINLINE void FN(rows_merge_tile)(double *BNCY_RESTRICT gmean,
                                              double *BNCY_RESTRICT gm2, double wgroup,
                                              const double *BNCY_RESTRICT s1,
                                              const double *BNCY_RESTRICT s2,
                                              const CT *BNCY_RESTRICT mt, double wt, int64_t nc) {
    const double f = wt / (wgroup + wt), h = wgroup * f;
    int64_t c;
    BNCY_IVDEP for (c = 0; c < nc; c++) {
        /* the tile's exact mean is mt + s1/wt (s1 removes the rounding of the shift) */
        const double u = s1[c] / wt;
        const double tmean = (double)mt[c] + u;
        double tm2 = s2[c] - s1[c] * u;
        double delta;
        tm2 = tm2 < 0.0 ? 0.0 : tm2; /* rounding only; NaN is kept */
        if (wgroup == 0.0) {
            gmean[c] = tmean;
            gm2[c] = tm2;
        } else {
            delta = tmean - gmean[c];
            gmean[c] += delta * f;
            gm2[c] += tm2 + delta * delta * h;
        }
    }
}

static void FN(rows_stats_unit)(const T *x, bncy_strides xs, bncy_shape sh, const CT *mask,
                                int64_t p0, int64_t p1, int64_t c0, int64_t nc, int64_t cblock,
                                double *gw, double *gmean, double *gm2, int pf) {
    int64_t offs[BNCY_TILE_ROWS_MAX];
    double wr[BNCY_TILE_ROWS_MAX], s[BNCY_CBLOCK_MAX];
    CT differ[BNCY_CBLOCK_MAX];
    /* the shift and the tile sums, placed so that channel `head` starts a line in each */
    CT mt_room[BNCY_CBLOCK_MAX + 2 * BNCY_ALIGN / sizeof(CT)];
    double s1_room[BNCY_CBLOCK_MAX + 2 * BNCY_ALIGN / sizeof(double)];
    double s2_room[BNCY_CBLOCK_MAX + 2 * BNCY_ALIGN / sizeof(double)];
    /* the plan's block width, not nc: the tiles of every block, however its channels fall, cover
       the same rows */
    const int64_t tile_rows =
        bncy_min64(BNCY_TILE_ROWS_MAX, bncy_max64(1, BNCY_ROWS_TILE / cblock));
    const T *xc = x + c0 * xs.chan;
    const int64_t head = FN(rows_head)(xc, xs, sh, mask != NULL, nc);
    CT *mt = (CT *)bncy_align_up(mt_room) + FN(lag)(head < 0 ? 0 : head, sizeof(CT));
    double *s1 = (double *)bncy_align_up(s1_room) + FN(lag)(head < 0 ? 0 : head, sizeof(double));
    double *s2 = (double *)bncy_align_up(s2_room) + FN(lag)(head < 0 ? 0 : head, sizeof(double));
    double wgroup = 0.0, lim_wt;
    int64_t t0, c, p, redo;
    /* the group's first tile with weight sets gmean and gm2 (rows_merge_tile) */
    for (t0 = p0; t0 < p1; t0 += tile_rows) {
        const int64_t t1 = bncy_min64(p1, t0 + tile_rows);
        FN(bncy_pos) q = FN(pos_at)(t0, sh, xs);
        double wt = 0.0;
        int64_t nr = 0;
        /* the tile's rows; masked-out rows are left out (not even a NaN there counts) */
        p = t0;
        if (!mask && sh.inner == 1) { /* one row per outer index: offsets o * outer stride */
            for (; p < t1; p++) offs[p - t0] = p * xs.outer;
            nr = t1 - t0;
        }
        for (; p < t1; p++, FN(pos_next)(&q, sh, xs)) {
            if (mask) {
                const double w = (double)mask[p];
                if (w == 0.0) continue;
                wr[nr] = w;
                wt += w;
            }
            offs[nr++] = q.off;
        }
        if (!mask) wt = (double)nr;
        if (nr == 0 || wt == 0.0) continue;
        lim_wt = 0.8 * wt;
        /* One pass: deviations from a shift -- the group's mean so far, or for its first tile
           the mean of its first rows -- summed in single precision by blocks of rows into
           double.
           The shift is exact-ish (and exact for a constant channel, whose deviations are 0);
           where it is too far from the tile mean for the centered sums to keep their digits
           (|sum d|^2 / W > 0.8 sum d^2, i.e. the shift more than 2 std away: at most ~2.3 bits
           of the centered sum would cancel), or on overflow/NaN, the channel is redone with its
           exact mean (the tile is in cache). */
        if (wgroup == 0.0) { /* the group's first tile: the mean of its first few rows */
            const int64_t ns = bncy_min64(nr, 8);
            const T *x0 = xc + offs[0];
            double ws = 0.0;
            for (p = 0; p < ns; p++) ws += mask ? wr[p] : 1.0;
            FN(rows_tile_sum)(s, xc, xs.chan, offs, mask ? wr : NULL, ns, nc);
            /* a sample of equal values gives that value itself, so that a constant channel
               has deviations exactly 0 (weights or not); a non-finite mean is redone below.
               Without weights and with a single-precision compute type, the sum of up to 8
               equal values v is exact (as 2v and 4v in the compute type, then in double), and
               so is its quotient by ns: the sample mean is v itself, with no count needed. */
            const int exact_sample = !mask && sizeof(CT) < sizeof(double);
            for (c = 0; c < nc; c++) {
                mt[c] = LOAD(x0 + c * xs.chan);
                differ[c] = exact_sample ? (CT)1 : (CT)0; /* 1: take the sample mean */
            }
            for (p = 1; p < ns && !exact_sample; p++) {
                const T *xp = xc + offs[p];
                /* counts the sampled values unequal to the first (NaN is unequal to all) */
                if (xs.chan == 1) {
                    BNCY_IVDEP for (c = 0; c < nc; c++)
                        differ[c] += LOAD(xp + c) != mt[c] ? (CT)1 : (CT)0;
                } else {
                    for (c = 0; c < nc; c++)
                        differ[c] += LOAD(xp + c * xs.chan) != mt[c] ? (CT)1 : (CT)0;
                }
            }
            if (exact_sample && (ns & (ns - 1)) == 0) {
                /* ws = ns a power of two: s * (1 / ws) is s / ws exactly, and vectorizes */
                const double rws = 1.0 / ws;
                BNCY_IVDEP for (c = 0; c < nc; c++) mt[c] = (CT)(s[c] * rws);
            } else {
                for (c = 0; c < nc; c++)
                    if (differ[c] != (CT)0) mt[c] = (CT)(s[c] / ws);
            }
        }
        if (head >= 0) {
            /* the whole vectors from the first aligned channel on, and where channels are left
               before or after them, whole vectors from the start or to the end: the overlaps
               are computed twice, to the same values, rather than one at a time */
            const int64_t vw = (int64_t)(BNCY_ALIGN / sizeof(CT));
            const int64_t body = (nc - head) / vw * vw;
            if (head) /* whole vectors over the head (with narrow types, more than one) */
                FN(rows_tile_dev)(s1, s2, mt, xc, 1, offs, NULL, nr, bncy_cdiv(head, vw) * vw, 0);
            FN(rows_tile_dev)(s1 + head, s2 + head, mt + head, xc + head, 1, offs, NULL, nr, body,
                              pf);
            if (head + body < nc)
                FN(rows_tile_dev)(s1 + nc - vw, s2 + nc - vw, mt + nc - vw, xc + nc - vw, 1,
                                  offs, NULL, nr, vw, 0);
        } else {
            FN(rows_tile_dev)(s1, s2, mt, xc, xs.chan, offs, mask ? wr : NULL, nr, nc, pf);
        }
        /* a branch-free count of channels to redo (s2 - s2 is 0 unless s2 is Inf or NaN) */
        redo = 0;
        BNCY_IVDEP for (c = 0; c < nc; c++) /* s1 is NaN or Inf only where s2 is too */
            redo += (s1[c] * s1[c] > lim_wt * s2[c]) | (s2[c] - s2[c] != 0.0);
        for (c = 0; redo && c < nc; c++) {
            if (!(s1[c] * s1[c] <= lim_wt * s2[c]) || !isfinite(s2[c])) {
                const double m = FN(rows_tile_mean_exact)(xc + c * xs.chan, offs,
                                                          mask ? wr : NULL, nr, wt);
                mt[c] = (CT)m;
                FN(rows_tile_dev)(&s1[c], &s2[c], &mt[c], xc + c * xs.chan, xs.chan, offs,
                                  mask ? wr : NULL, nr, 1, 0);
                if (!isfinite(s2[c]) && isfinite((double)mt[c])) /* squares beyond CT range */
                    FN(rows_tile_dev_exact)(&s1[c], &s2[c], (double)mt[c], xc + c * xs.chan,
                                            offs, mask ? wr : NULL, nr);
            }
        }
        FN(rows_merge_tile)(gmean, gm2, wgroup, s1, s2, mt, wt, nc);
        wgroup += wt;
        for (c = 0; c < nc; c++) mt[c] = (CT)gmean[c]; /* the next tile's shift */
    }
    if (wgroup == 0.0)
        for (c = 0; c < nc; c++) gmean[c] = gm2[c] = 0.0;
    *gw = wgroup;
}

/* ---------------------------------------------------------------------------------------------
 * Statistics, planes family: a unit is (group of positions, one channel); the inner loop runs
 * along the inner dim with BNCY_LANES independent accumulators combined in a fixed order.
 * ------------------------------------------------------------------------------------------- */
BNCY_INLINE double FN(lanes_total)(const double *a) {
    return ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
}

/* In the compute type: sa = (a0 + a1) + (a2 + a3) and sab = a0 b0 + a1 b1 + a2 b2 + a3 b3 as
   a chain of fused multiply-adds. With b = a the centered sums of the statistics, with a = dy,
   b = x - mean those of the gradient. */
BNCY_INLINE void FN(four_sums)(CT a0, CT a1, CT a2, CT a3, CT b0, CT b1, CT b2, CT b3, CT *sa,
                               CT *sab) {
    CT p = a0 * b0;
    p = MULADD(a1, b1, p);
    p = MULADD(a2, b2, p);
    p = MULADD(a3, b3, p);
    *sa = (a0 + a1) + (a2 + a3);
    *sab = p;
}

/* Centered sums s1 = sum(x - mt), s2 = sum((x - mt)^2) of one tile of n elements at stride si,
   into BNCY_LANES independent double lanes along the plane (element e goes to lane e mod
   BNCY_LANES), summed in a fixed order. Runs of eight vectors of lanes are reduced in the
   compute type first: as 2 * BNCY_LANES side-by-side lanes (one 512-bit vector of float
   lanes), four vectors each, whose halves are then added lane to lane, so each lane's sum is a
   tree of eight (three roundings, as in the rows kernels) before its one conversion to double.
   A remaining run of four vectors is reduced the same way with no halves; the last elements
   go one by one. */
BNCY_INLINE void FN(plane_dev_acc)(const T *BNCY_RESTRICT seg, int64_t si, int64_t n, CT mt,
                                   double *BNCY_RESTRICT b1, double *BNCY_RESTRICT b2,
                                   const int pf) {
    const int64_t w = 2 * BNCY_LANES, run = 8 * BNCY_LANES, q = 4 * BNCY_LANES;
    int64_t k = 0, l, nq;
    for (; k + run <= n; k += run) {
        CT t1[2 * BNCY_LANES], t2[2 * BNCY_LANES];
        if (pf && si == 1) { /* hints for the memory ahead, one per line of the run */
            int64_t b;
            for (b = 0; b < run * (int64_t)sizeof(T); b += 64)
                BNCY_PREFETCH(seg + k, BNCY_PREFETCH_BYTES + b);
        }
        BNCY_LANE_LOOP for (l = 0; l < w; l++) {
            const T *p = seg + (k + l) * si;
            const CT d0 = LOAD(p) - mt, d1 = LOAD(p + w * si) - mt;
            const CT d2 = LOAD(p + 2 * w * si) - mt, d3 = LOAD(p + 3 * w * si) - mt;
            FN(four_sums)(d0, d1, d2, d3, d0, d1, d2, d3, &t1[l], &t2[l]);
        }
        BNCY_LANE_LOOP for (l = 0; l < BNCY_LANES; l++) {
            b1[l] += (double)(t1[l] + t1[l + BNCY_LANES]);
            b2[l] += (double)(t2[l] + t2[l + BNCY_LANES]);
        }
    }
    for (; k + q <= n; k += q) {
        if (pf && si == 1) BNCY_PREFETCH(seg + k, BNCY_PREFETCH_BYTES);
        BNCY_LANE_LOOP for (l = 0; l < BNCY_LANES; l++) {
            const T *p = seg + (k + l) * si;
            const CT d0 = LOAD(p) - mt, d1 = LOAD(p + BNCY_LANES * si) - mt;
            const CT d2 = LOAD(p + 2 * BNCY_LANES * si) - mt, d3 = LOAD(p + 3 * BNCY_LANES * si) - mt;
            CT s, sq;
            FN(four_sums)(d0, d1, d2, d3, d0, d1, d2, d3, &s, &sq);
            b1[l] += (double)s;
            b2[l] += (double)sq;
        }
    }
    for (nq = k; k < n; k++) {
        const double d = (double)(LOAD(seg + k * si) - mt);
        b1[(k - nq) % BNCY_LANES] += d;
        b2[(k - nq) % BNCY_LANES] += d * d;
    }
}

/* The same, one run into fresh lanes, summed. */
BNCY_INLINE void FN(plane_dev)(const T *BNCY_RESTRICT seg, int64_t si, int64_t n, CT mt,
                               double *s1_out, double *s2_out, const int pf) {
    double b1[BNCY_LANES] = {0}, b2[BNCY_LANES] = {0};
    FN(plane_dev_acc)(seg, si, n, mt, b1, b2, pf);
    *s1_out = FN(lanes_total)(b1);
    *s2_out = FN(lanes_total)(b2);
}

/* Centered sums of channel c over positions [ta, tb) about the shift mt. */
static void FN(span_dev)(const T *x, bncy_strides xs, bncy_shape sh, int64_t si, int64_t c,
                         int64_t ta, int64_t tb, CT mt, double *s1_out, double *s2_out) {
    double s1 = 0.0, s2 = 0.0;
    int64_t p, k;
    for (p = ta; p < tb;) {
        const int64_t o = p / sh.inner, i = p - o * sh.inner;
        const int64_t n = bncy_min64(tb - p, sh.inner - i);
        const T *seg = x + o * xs.outer + c * xs.chan + i * si;
        double a, b;
        FN(plane_dev)(seg, si, n, mt, &a, &b, 0);
        s1 += a;
        s2 += b;
        p += n;
    }
    if (!isfinite(s2) && isfinite((double)mt)) { /* squares beyond the CT range: in double */
        s1 = s2 = 0.0;
        for (p = ta; p < tb;) {
            const int64_t o = p / sh.inner, i = p - o * sh.inner;
            const int64_t n = bncy_min64(tb - p, sh.inner - i);
            const T *seg = x + o * xs.outer + c * xs.chan + i * si;
            for (k = 0; k < n; k++) {
                const double d = (double)LOAD(seg + k * si) - (double)mt;
                s1 += d;
                s2 += d * d;
            }
            p += n;
        }
    }
    *s1_out = s1;
    *s2_out = s2;
}

/* The mean of channel c over positions [ta, tb): compute-type quads into double lanes, or all in
   double when a compute-type partial sum overflowed (or the data hold Inf/NaN). */
static double FN(span_mean)(const T *x, bncy_strides xs, bncy_shape sh, int64_t si, int64_t c,
                            int64_t ta, int64_t tb) {
    double a[BNCY_LANES] = {0}, m;
    const int64_t q = 4 * BNCY_LANES;
    int64_t p, k, l;
    for (p = ta; p < tb;) {
        const int64_t o = p / sh.inner, i = p - o * sh.inner;
        const int64_t n = bncy_min64(tb - p, sh.inner - i), nq = n - n % q;
        const T *seg = x + o * xs.outer + c * xs.chan + i * si;
        for (k = 0; k < nq; k += q) {
            BNCY_LANE_LOOP for (l = 0; l < BNCY_LANES; l++) {
                const T *e = seg + (k + l) * si;
                a[l] += (double)((LOAD(e) + LOAD(e + BNCY_LANES * si)) +
                                 (LOAD(e + 2 * BNCY_LANES * si) + LOAD(e + 3 * BNCY_LANES * si)));
            }
        }
        for (k = nq; k < n; k++) a[(k - nq) % BNCY_LANES] += (double)LOAD(seg + k * si);
        p += n;
    }
    m = FN(lanes_total)(a) / (double)(tb - ta);
    if (!isfinite(m)) {
        double e[BNCY_LANES] = {0};
        for (p = ta; p < tb;) {
            const int64_t o = p / sh.inner, i = p - o * sh.inner;
            const int64_t n = bncy_min64(tb - p, sh.inner - i);
            const T *seg = x + o * xs.outer + c * xs.chan + i * si;
            for (k = 0; k < n; k++) e[k % BNCY_LANES] += (double)LOAD(seg + k * si);
            p += n;
        }
        m = FN(lanes_total)(e) / (double)(tb - ta);
    }
    return m;
}

/* The shift of a channel's first tile: the mean of a small sample at the tile's start (within a
   fraction of a std of the tile's mean), or exactly the sampled value when the sample holds one
   value (then a constant channel has deviations exactly 0). */
BNCY_INLINE CT FN(sample_shift)(const T *seg, int64_t si, int64_t n) {
    const int64_t ns = bncy_min64(n, 8);
    const CT v0 = LOAD(seg);
    CT a = 0;
    int same = 1;
    int64_t k;
    for (k = 0; k < ns; k++) {
        const CT v = LOAD(seg + k * si);
        a += v;
        same &= v == v0;
    }
    if (same) return v0;
    if (!isfinite(a)) a = (CT)0; /* a partial sum overflowed: any finite shift (redone below) */
    return a / (CT)ns;
}

#define BNCY_SPAN_CBLOCK 256 /* channels whose tile state a planes unit keeps at once */

/* Statistics without weights of positions [p0, p1), whole planes of a short contiguous inner dim
   (sequences (N, C, T), small images): a tile is a run of up to BNCY_SHORT_TILE_PLANES planes
   per channel, and each channel's tile is reduced into one set of lanes across its planes (one
   lane sum, redo check and merge per tile, not per plane). Shifts, the redo rule and the merge
   are those of planes_stats_plain. The planes of one tile are BNCY_SHORT_TILE_PLANES streams
   through memory, advancing together channel by channel. */
static void FN(planes_stats_short)(const T *x, bncy_strides xs, bncy_shape sh, int64_t p0,
                                   int64_t p1, double *gw, double *gmean, double *gm2,
                                   const int pf) {
    const int64_t L = sh.inner, o0 = p0 / L, o1 = p1 / L;
    const int64_t to = bncy_max64(1, bncy_min64(BNCY_SHORT_TILE_PLANES, BNCY_PLANES_TILE / L));
    int64_t c, oa, o;
    for (c = 0; c < sh.chan; c++) gw[c] = gmean[c] = gm2[c] = 0.0;
    for (oa = o0; oa < o1; oa += to) {
        const int64_t ob = bncy_min64(o1, oa + to);
        const double n = (double)((ob - oa) * L), lim_n = 0.8 * n;
        for (c = 0; c < sh.chan; c++) {
            const T *base = x + c * xs.chan;
            double b1[BNCY_LANES] = {0}, b2[BNCY_LANES] = {0}, s1, s2, m2;
            CT mt = oa == o0 ? FN(sample_shift)(base + o0 * xs.outer, 1, L) : (CT)gmean[c];
            for (o = oa; o < ob; o++) FN(plane_dev_acc)(base + o * xs.outer, 1, L, mt, b1, b2, pf);
            s1 = FN(lanes_total)(b1);
            s2 = FN(lanes_total)(b2);
            if (!(s1 * s1 <= lim_n * s2) || !isfinite(s2)) { /* shift too far off, or Inf/NaN */
                mt = (CT)FN(span_mean)(x, xs, sh, 1, c, oa * L, ob * L);
                FN(span_dev)(x, xs, sh, 1, c, oa * L, ob * L, mt, &s1, &s2);
            }
            m2 = s2 - s1 * (s1 / n);
            bncy_chan_merge(&gw[c], &gmean[c], &gm2[c], n, (double)mt + s1 / n,
                            m2 < 0.0 ? 0.0 : m2);
        }
    }
}

/* Statistics without weights of positions [p0, p1) for every channel. Tiles are runs of up to
   BNCY_PLANES_TILE positions, which may span several segments along the inner dim (short inner
   dims: sequences, small images); each channel's tile is reduced in one pass over deviations
   from a shift -- the channel's running mean, or for the group's first tile a sample mean --
   and merged into the channel's running state. Where the shift is too far from the tile's mean
   for the centered sums to keep their digits (|s1|^2 / n > 0.8 s2: more than 2 std away, as in
   the rows kernels), or on overflow/NaN, the
   channel's tile is redone about its own mean (the tile is in cache). The shift is rounded to
   the compute type: then x - mt is a small multiple of x's ulp for a constant channel, every
   sum is exact, and its variance is exactly 0. Memory is read segment by segment in order. */
BNCY_INLINE void FN(planes_stats_plain)(const T *x, bncy_strides xs, bncy_shape sh, int64_t p0,
                                        int64_t p1, double *gw, double *gmean, double *gm2,
                                        const int unit_inner, const int pf) {
    const int64_t si = unit_inner ? 1 : xs.inner;
    CT mt[BNCY_SPAN_CBLOCK];
    double s1[BNCY_SPAN_CBLOCK], s2[BNCY_SPAN_CBLOCK];
    int64_t c0, c, ta, tb, p, redo;
    if (unit_inner && sh.inner <= BNCY_PLANE_SHORT_MAX && p0 % sh.inner == 0 &&
        p1 % sh.inner == 0) {
        FN(planes_stats_short)(x, xs, sh, p0, p1, gw, gmean, gm2, pf);
        return;
    }
    for (c = 0; c < sh.chan; c++) gw[c] = gmean[c] = gm2[c] = 0.0;
    for (ta = p0; ta < p1; ta = tb) {
        /* a tile of BNCY_PLANES_TILE positions, or the rest of a plane of up to
           BNCY_PLANE_WHOLE_MAX (read in one run per channel) */
        const int64_t whole = sh.inner > BNCY_PLANES_TILE && sh.inner <= BNCY_PLANE_WHOLE_MAX;
        tb = bncy_min64(p1, ta + (whole ? sh.inner - ta % sh.inner : BNCY_PLANES_TILE));
        const double n = (double)(tb - ta);
        for (c0 = 0; c0 < sh.chan; c0 += BNCY_SPAN_CBLOCK) {
            const int64_t nc = bncy_min64(BNCY_SPAN_CBLOCK, sh.chan - c0);
            const double lim_n = 0.8 * n;
            for (c = 0; c < nc; c++) s1[c] = s2[c] = 0.0;
            for (p = ta; p < tb;) {
                const int64_t o = p / sh.inner, i = p - o * sh.inner;
                const int64_t len = bncy_min64(tb - p, sh.inner - i);
                const T *seg = x + o * xs.outer + c0 * xs.chan + i * si;
                for (c = 0; c < nc; c++) {
                    double a, b;
                    if (p == p0) mt[c] = FN(sample_shift)(seg + c * xs.chan, si, len);
                    else if (p == ta) mt[c] = (CT)gmean[c0 + c];
                    FN(plane_dev)(seg + c * xs.chan, si, len, mt[c], &a, &b, pf);
                    s1[c] += a;
                    s2[c] += b;
                }
                p += len;
            }
            redo = 0;
            for (c = 0; c < nc; c++) /* s1 is NaN or Inf only where s2 is too */
                redo += (s1[c] * s1[c] > lim_n * s2[c]) | (s2[c] - s2[c] != 0.0);
            for (c = 0; c < nc; c++) {
                double m2;
                if (redo && (!(s1[c] * s1[c] <= lim_n * s2[c]) || !isfinite(s2[c]))) {
                    mt[c] = (CT)FN(span_mean)(x, xs, sh, si, c0 + c, ta, tb);
                    FN(span_dev)(x, xs, sh, si, c0 + c, ta, tb, mt[c], &s1[c], &s2[c]);
                }
                m2 = s2[c] - s1[c] * (s1[c] / n);
                bncy_chan_merge(&gw[c0 + c], &gmean[c0 + c], &gm2[c0 + c], n,
                                (double)mt[c] + s1[c] / n, m2 < 0.0 ? 0.0 : m2);
            }
        }
    }
}

/* The same with weights (all in double: masks are the slower, rarer path). */
BNCY_INLINE void FN(plane_tile_weighted)(const T *BNCY_RESTRICT seg, int64_t si,
                                         const CT *BNCY_RESTRICT wseg, int64_t n, double *wt_out,
                                         double *mean_out, double *m2_out) {
    double a[BNCY_LANES] = {0}, wa[BNCY_LANES] = {0};
    double b1[BNCY_LANES] = {0}, b2[BNCY_LANES] = {0};
    double wt, mt, s1, s2, m2;
    double first = 0.0;
    int64_t k, seen = 0, same = 1;
    for (k = 0; k < n; k++) {
        const double w = (double)wseg[k];
        const double v = (double)LOAD(seg + k * si);
        a[k % BNCY_LANES] += w != 0.0 ? w * v : 0.0;
        wa[k % BNCY_LANES] += w;
        if (w != 0.0) {
            if (!seen) first = v;
            same &= v == first;
            seen = 1;
        }
    }
    wt = FN(lanes_total)(wa);
    *wt_out = wt;
    if (wt == 0.0) {
        *mean_out = *m2_out = 0.0;
        return;
    }
    /* equal weighted values: exactly that value, so a constant channel has variance 0 */
    mt = same ? first : (double)(CT)(FN(lanes_total)(a) / wt);
    for (k = 0; k < n; k++) {
        const double w = (double)wseg[k];
        const double d = (double)LOAD(seg + k * si) - mt;
        b1[k % BNCY_LANES] += w != 0.0 ? w * d : 0.0;
        b2[k % BNCY_LANES] += w != 0.0 ? (w * d) * d : 0.0;
    }
    s1 = FN(lanes_total)(b1);
    s2 = FN(lanes_total)(b2);
    m2 = s2 - s1 * (s1 / wt);
    *mean_out = mt + s1 / wt;
    *m2_out = m2 < 0.0 ? 0.0 : m2;
}

/* A tile of a masked or broadcast plane (everything else goes through planes_stats_plain). */
BNCY_INLINE void FN(plane_tile)(const T *BNCY_RESTRICT seg, int64_t si,
                                const CT *BNCY_RESTRICT wseg, int64_t n, double *wt_out,
                                double *mean_out, double *m2_out, const int has_mask) {
    if (has_mask) {
        FN(plane_tile_weighted)(seg, si, wseg, n, wt_out, mean_out, m2_out);
    } else {
        /* a broadcast (zero-stride) run holds one value n times: its mean is that value and
           its deviations are 0 (NaN for Inf/NaN, as the general path gives) */
        const double v = (double)LOAD(seg);
        *wt_out = (double)n;
        *mean_out = v;
        *m2_out = v - v;
    }
}

/* One group of positions [p0, p1) for every channel: segments along the inner dim in order,
   each cut into tiles, each tile reduced per channel and merged into that channel's running state
   (w, mean, m2). Walking segment by segment reads memory in order; each channel still sees its
   tiles in position order, whatever the thread count. */
BNCY_INLINE void FN(planes_stats_impl)(const T *x, bncy_strides xs, bncy_shape sh,
                                       const CT *mask, int64_t p0, int64_t p1, double *gw,
                                       double *gmean, double *gm2, const int has_mask,
                                       const int unit_inner) {
    const int64_t si = unit_inner ? 1 : xs.inner;
    int64_t p = p0, c;
    for (c = 0; c < sh.chan; c++) gw[c] = gmean[c] = gm2[c] = 0.0;
    while (p < p1) {
        const int64_t o = p / sh.inner, i = p - o * sh.inner;
        const int64_t n = bncy_min64(bncy_min64(p1 - p, sh.inner - i), BNCY_PLANES_TILE);
        const T *seg = x + o * xs.outer + i * si;
        for (c = 0; c < sh.chan; c++) {
            double tw, tmean, tm2;
            FN(plane_tile)(seg + c * xs.chan, si, has_mask ? mask + p : NULL, n, &tw, &tmean,
                           &tm2, has_mask);
            bncy_chan_merge(&gw[c], &gmean[c], &gm2[c], tw, tmean, tm2);
        }
        p += n;
    }
}

static void FN(planes_stats_unit)(const T *x, bncy_strides xs, bncy_shape sh, const CT *mask,
                                  int64_t p0, int64_t p1, double *gw, double *gmean,
                                  double *gm2, int pf) {
    if (mask) {
        if (xs.inner == 1)
            FN(planes_stats_impl)(x, xs, sh, mask, p0, p1, gw, gmean, gm2, 1, 1);
        else
            FN(planes_stats_impl)(x, xs, sh, mask, p0, p1, gw, gmean, gm2, 1, 0);
    } else if (xs.inner == 0) { /* a broadcast run: one value along the inner dim */
        FN(planes_stats_impl)(x, xs, sh, NULL, p0, p1, gw, gmean, gm2, 0, 0);
    } else if (xs.inner == 1) {
        FN(planes_stats_plain)(x, xs, sh, p0, p1, gw, gmean, gm2, 1, pf);
    } else {
        FN(planes_stats_plain)(x, xs, sh, p0, p1, gw, gmean, gm2, 0, pf);
    }
}

/* Unit u of the statistics: (group, channel block); for planes the block is every channel
   except where the plan has few groups (bncy_make_plan). Writes its partials into part =
   [w | mean | m2], each G x C, g-major. The channel blocks of one group are consecutive units,
   so the static split gives each thread whole groups of positions: about the rows its share of
   the elementwise pass then reads, still in its own cache. */
static BNCY_NOINLINE void FN(stats_unit)(const T *x, bncy_strides xs, bncy_shape sh,
                                         const CT *mask, const bncy_plan *plan, double *part,
                                         int64_t u) {
    const int64_t G = plan->n_groups, C = sh.chan, g = u / plan->n_cblocks;
    const int64_t blk = u % plan->n_cblocks;
    const int64_t p0 = g * plan->group_len, p1 = bncy_min64(plan->M, p0 + plan->group_len);
    double *pw = part, *pm = part + G * C, *pm2 = part + 2 * G * C;
    /* prefetch hints pay where the data stream from memory, not from the caches */
    const int pf = (double)plan->M * (double)C * sizeof(T) >= BNCY_PREFETCH_MIN_BYTES;
    if (plan->family == BNCY_ROWS) {
        /* blocks after the first start on a line (FN(rows_head)); the last may be empty */
        const int64_t shift =
            plan->n_cblocks > 1 ? bncy_max64(0, FN(rows_head)(x, xs, sh, mask != NULL, C)) : 0;
        const int64_t c0 = blk ? bncy_min64(C, blk * plan->cblock + shift) : 0;
        const int64_t nc = bncy_min64(C, (blk + 1) * plan->cblock + shift) - c0;
        double gw;
        int64_t c;
        if (nc <= 0) return;
        FN(rows_stats_unit)(x, xs, sh, mask, p0, p1, c0, nc, plan->cblock, &gw, pm + g * C + c0,
                            pm2 + g * C + c0, pf);
        for (c = 0; c < nc; c++) pw[g * C + c0 + c] = gw;
    } else { /* the block's channels as a narrower x (one block unless plan.n_cblocks > 1) */
        const int64_t c0 = blk * plan->cblock;
        bncy_shape shb = sh;
        shb.chan = bncy_min64(plan->cblock, C - c0);
        FN(planes_stats_unit)(x + c0 * xs.chan, xs, shb, mask, p0, p1, pw + g * C + c0,
                              pm + g * C + c0, pm2 + g * C + c0, pf);
    }
}

/* Chan-merge the G groups' partials in order, for C channels of partials laid out G x ld
   (ld >= C: a range of channels of a wider layout). A group's weight is the same for every
   channel (weights belong to positions), so the merge factors are scalars and the channel loop
   vectorizes. With finish, m2sum becomes the variance m2 / w (NaN where no weight). */
static void FN(merge_groups)(const double *part, int64_t G, int64_t ld, int64_t C, double *wsum,
                             double *mean, double *m2sum, int finish) {
    const double *pw = part, *pm = part + G * ld, *pm2 = part + 2 * G * ld;
    double wa = 0.0;
    int64_t g, c;
    /* one pass per group with weight (the first copies); a channel block stays in L1 */
    for (g = 0; g < G; g++) {
        const double wb = pw[g * ld], w = wa + wb;
        const double *BNCY_RESTRICT mb = pm + g * ld, *BNCY_RESTRICT m2b = pm2 + g * ld;
        if (wb == 0.0) continue;
        if (wa == 0.0) {
            memcpy(mean, mb, (size_t)C * sizeof(double));
            memcpy(m2sum, m2b, (size_t)C * sizeof(double));
        } else {
            const double f = wb / w, h = wa * f;
            BNCY_IVDEP for (c = 0; c < C; c++) {
                const double delta = mb[c] - mean[c];
                mean[c] += delta * f;
                m2sum[c] += m2b[c] + delta * delta * h;
            }
        }
        wa = w;
    }
    for (c = 0; c < C; c++) wsum[c] = wa;
    if (wa == 0.0) { /* no weight: zero partials, or with finish NaN statistics */
        const double z = finish ? (double)NAN : 0.0;
        for (c = 0; c < C; c++) mean[c] = m2sum[c] = z;
    } else if (finish) { /* the variance m2 / w, as bncy_finish_moments */
        int e;
        if (frexp(wa, &e) == 0.5 && e > -1000 && e < 1000) {
            /* w a power of two: m2 * (1 / w) is m2 / w exactly (both are the correctly rounded
               m2 * 2^-k), and a multiply costs far less than a divide */
            const double r = 1.0 / wa;
            BNCY_IVDEP for (c = 0; c < C; c++) m2sum[c] *= r;
        } else {
            BNCY_IVDEP for (c = 0; c < C; c++) m2sum[c] /= wa;
        }
    }
}

#define BNCY_CONSTS_CHUNK 64 /* channels per share of the per-channel work in one region */

/* The statistics in one parallel region: the group partials (stats_unit), then each channel's
   merge of them (split by channels), and with finish the mean and variance (m2 / w; NaN where
   no weight). wsum, mean and m2sum have length chan. */
static int FN(moments_team)(const T *x, bncy_strides xs, bncy_shape sh, const CT *mask,
                            double *wsum, double *mean, double *m2sum, int finish,
                            int n_threads) {
    const int64_t C = sh.chan, n_chunks = bncy_cdiv(C, BNCY_CONSTS_CHUNK);
    const bncy_plan plan = bncy_make_plan(sh, xs);
    const int64_t G = plan.n_groups;
    const int nt = bncy_threads_for(plan.M * C, n_threads);
    double *part = (double *)malloc((size_t)(3 * G * C) * sizeof(double)); /* [w | mean | m2] */
    if (!part) return BNCY_ERR_NOMEM;
    BNCY_TEAM(nt, {
        int64_t u;
        BNCY_TEAM_FOR(u, plan.n_units, { FN(stats_unit)(x, xs, sh, mask, &plan, part, u); });
        BNCY_TEAM_FOR(u, n_chunks, {
            const int64_t c0 = u * BNCY_CONSTS_CHUNK, c1 = bncy_min64(C, c0 + BNCY_CONSTS_CHUNK);
            FN(merge_groups)(part + c0, G, C, c1 - c0, wsum + c0, mean + c0, m2sum + c0, finish);
        });
    });
    free(part);
    return BNCY_OK;
}

/* Partial statistics of every channel: total weight w, mean and sum of squared deviations m2
   (w = 0, mean = m2 = 0 for a channel with no weight). */
int FN(bncy_moments_partial)(const T *x, bncy_strides xs, bncy_shape sh, const CT *mask,
                             double *wsum, double *mean, double *m2sum, int n_threads) {
    int64_t c;
    if (sh.outer < 0 || sh.chan < 0 || sh.inner < 0) return BNCY_ERR_ARG;
    if (sh.chan == 0) return BNCY_OK;
    if (sh.outer == 0 || sh.inner == 0) {
        for (c = 0; c < sh.chan; c++) wsum[c] = mean[c] = m2sum[c] = 0.0;
        return BNCY_OK;
    }
    return FN(moments_team)(x, xs, sh, mask, wsum, mean, m2sum, 0, n_threads);
}

/* Statistics of every channel into mean/var (double, length chan; NaN where no weight). */
int FN(bncy_moments)(const T *x, bncy_strides xs, bncy_shape sh, const CT *mask, double *mean,
                     double *var, int n_threads) {
    double *w;
    int64_t c;
    int status;
    if (sh.outer < 0 || sh.chan < 0 || sh.inner < 0) return BNCY_ERR_ARG;
    if (sh.chan == 0) return BNCY_OK;
    if (sh.outer == 0 || sh.inner == 0) {
        for (c = 0; c < sh.chan; c++) mean[c] = var[c] = NAN;
        return BNCY_OK;
    }
    w = (double *)malloc((size_t)sh.chan * sizeof(double));
    if (!w) return BNCY_ERR_NOMEM;
    status = FN(moments_team)(x, xs, sh, mask, w, mean, var, 1, n_threads);
    free(w);
    return status;
}


/* ---------------------------------------------------------------------------------------------
 * Elementwise normalize: y = (x - hi) * a + b, with hi the mean rounded to the compute type and
 * b = shift - (mean - hi) * scale folded in double. x - hi is exact when x is near the mean (the
 * case where digits are at stake), so the digits a single-precision mean would lose are kept,
 * with one subtraction and one fused multiply-add per element. A constant channel has x == hi
 * and gives exactly b == shift.
 * ------------------------------------------------------------------------------------------- */
static void FN(make_consts)(CT *hi, CT *a, CT *b, int64_t C, const double *mean,
                            const double *scale, const double *shift) {
    int64_t c;
    for (c = 0; c < C; c++) {
        const double m = mean[c];
        const CT h = (CT)m;
        const double lo = m - (double)h;
        hi[c] = h;
        a[c] = (CT)scale[c];
        /* lo == 0 keeps b exact (and avoids 0 * Inf) */
        b[c] = (CT)((shift ? shift[c] : 0.0) - (lo != 0.0 ? lo * scale[c] : 0.0));
    }
}

BNCY_INLINE void FN(rows_normalize_impl)(const T *x, bncy_strides xs, T *y, bncy_strides ys,
                                         bncy_shape sh, const CT *BNCY_RESTRICT hi,
                                         const CT *BNCY_RESTRICT a, const CT *BNCY_RESTRICT b,
                                         int64_t p0, int64_t p1, const int unit_chan) {
    const int64_t sxc = unit_chan ? 1 : xs.chan, syc = unit_chan ? 1 : ys.chan;
    FN(bncy_pos) qx = FN(pos_at)(p0, sh, xs), qy = FN(pos_at)(p0, sh, ys);
    int64_t p, c;
    for (p = p0; p < p1; p++) {
        const T *xr = x + qx.off;
        T *yr = y + qy.off;
        BNCY_IVDEP for (c = 0; c < sh.chan; c++) {
            const CT v = LOAD(xr + c * sxc);
            STORE(yr + c * syc, (v - hi[c]) * a[c] + b[c]);
        }
        FN(pos_next)(&qx, sh, xs);
        FN(pos_next)(&qy, sh, ys);
    }
}

/* Whether a plane run of n elements at p is peeled to an aligned output element (and maybe
   streamed from there): long runs, and with streamed stores also a shorter run that starts
   aligned and is whole lines (planes back to back of a line multiple, each aligned). */
BNCY_INLINE int FN(plane_peels)(const T *p, int64_t n, int stream) {
    return n >= BNCY_PEEL_MIN || (stream && (uintptr_t)p % BNCY_ALIGN == 0 &&
                                  (n * (int64_t)sizeof(T)) % BNCY_ALIGN == 0);
}

BNCY_INLINE void FN(plane_normalize_impl)(const T *xp, int64_t sxi, T *yp, int64_t syi,
                                          int64_t n, CT hi, CT a, CT b, const int stream) {
    int64_t i = 0;
    if (syi == 1 && FN(plane_peels)(yp, n, stream)) { /* up to the first aligned output */
        const int64_t k0 = bncy_peel(yp, (int64_t)sizeof(T), n);
        for (; i < k0; i++) STORE(yp + i, (LOAD(xp + i * sxi) - hi) * a + b);
        if (stream && sxi == 1 && (uintptr_t)(yp + i) % BNCY_ALIGN == 0)
            i += STREAM_PLANE(yp + i, xp + i, hi, a, b, n - i);
    }
    BNCY_IVDEP for (; i < n; i++) {
        const CT v = LOAD(xp + i * sxi);
        STORE(yp + i * syi, (v - hi) * a + b);
    }
}

/* Whether an elementwise pass over this shape reading n_in arrays streams its output
   (bn_stream.h; the rule is bncy_stream_pass's), for the dtypes and ISAs that have streaming
   stores. */
BNCY_INLINE int FN(streams)(bncy_shape sh, int n_in) {
    const double out_bytes = (double)sh.outer * (double)sh.inner * (double)sh.chan * sizeof(T);
    return BNCY_T_STREAMS && bncy_stream_pass(out_bytes, n_in);
}

/* Whether the arrays of that pass (n_in inputs and the output, each of the output's size) fill
   at most a quarter of the last-level cache: there its flat rows are walked four at a time
   (FN(walk_setup)), beyond it one at a time. */
BNCY_INLINE int FN(pass_in_cache)(bncy_shape sh, int n_in) {
    const double out_bytes = (double)sh.outer * (double)sh.inner * (double)sh.chan * sizeof(T);
    return !bncy_fills_llc_quarter((double)(n_in + 1) * out_bytes);
}

/* Whether flat rows of this shape keep one alignment from row to row (chan * sizeof(T) a
   multiple of BNCY_ALIGN), so one peel k0 and one rotation serve every row, and whether the
   array is long enough to be worth it. */
BNCY_INLINE int FN(rows_alignable)(bncy_shape sh) {
    return (sh.chan * (int64_t)sizeof(T)) % BNCY_ALIGN == 0 &&
           sh.outer * sh.inner * sh.chan >= BNCY_PEEL_MIN;
}

/* Channels [c0, c1) of the rotated copy of nq constant arrays (arr = nq arrays of length C one
   after the other) for a flat walk shifted by k0: rot[q C + j] = arr[q C + (j + k0) % C]. */
static void FN(rotate_consts_range)(CT *rot, const CT *arr, int64_t C, int64_t k0, int64_t c0,
                                    int64_t c1, int nq) {
    const int64_t a0 = c0, a1 = bncy_min64(c1, k0), b0 = bncy_max64(c0, k0), b1 = c1;
    int64_t q;
    for (q = 0; q < nq; q++) {
        if (a1 > a0) memcpy(rot + q * C + a0 + C - k0, arr + q * C + a0,
                            (size_t)(a1 - a0) * sizeof(CT));
        if (b1 > b0) memcpy(rot + q * C + b0 - k0, arr + q * C + b0,
                            (size_t)(b1 - b0) * sizeof(CT));
    }
}

/* Whether the flat rows normalize takes four rows at a time (loading each constant once for four
   values) rather than one, where its pass fits in the cache (FN(walk_setup)): for short rows,
   where the loop around a row costs. A long row is faster alone (on the first machine,
   (256, 1024) float32 normalized in 15.6 us by fours and 14.7 us by ones), and so are the rows
   of a pass that fills more of the cache, with fewer streams in flight. On the 2-core Zen 3 VM
   (32 MiB L3), out= calls, one row at a time against four (benchmarks/ab.py, 28 paired runs
   over 40 minutes, in benchmarks/results/ab-tuning-amd-epyc-zen3-2026-12-07.md), the runs'
   median B/A: on arrays of 8 MiB, 0.65 - 0.92 at one thread and 0.87 - 0.97 at two, though in
   the runs where the machine was quiet the inference at two threads took 0.95 - 1.17; on arrays
   of 4 MiB 1.00 - 1.04 and of 256 - 512 KiB 1.02 - 1.05 (kept by fours). Passes beyond half of
   the cache stream their output one row at a time anyway (FN(streams)). */
BNCY_INLINE int FN(rows_by_four)(int64_t C) {
    return C * (int64_t)sizeof(T) < BNCY_WIDE_ROW_BYTES;
}

/* Rows [p0, p1) of flat rows arrays (bncy_flat_rows) whose output rows start k0 elements before
   an aligned address (the same k0 for every row: chan * sizeof(T) is a multiple of BNCY_ALIGN).
   The run is walked as whole rows shifted by k0, so every vector store is aligned; hr/ar/br are
   the constants rotated by k0 (hr[k] = hi[(k + k0) % chan]). */
static BNCY_NOINLINE void FN(rows_flat_normalize_unit)(const T *x, T *y, int64_t C, int64_t k0,
                                                       const CT *BNCY_RESTRICT hi,
                                                       const CT *BNCY_RESTRICT a,
                                                       const CT *BNCY_RESTRICT b,
                                                       const CT *BNCY_RESTRICT hr,
                                                       const CT *BNCY_RESTRICT ar,
                                                       const CT *BNCY_RESTRICT br, int64_t p0,
                                                       int64_t p1, int stream, int four) {
    const T *BNCY_RESTRICT xf = x + p0 * C;
    T *BNCY_RESTRICT yf = y + p0 * C;
    const int64_t rows = p1 - p0;
    int64_t r, k;
    for (k = 0; k < k0; k++) STORE(yf + k, (LOAD(xf + k) - hi[k]) * a[k] + b[k]);
    r = 0;
    if (four) { /* each constant loaded once for four values */
        for (; r + 4 < rows || (k0 == 0 && r + 4 <= rows); r += 4) {
            const T *BNCY_RESTRICT x0 = xf + k0 + r * C, *BNCY_RESTRICT x1 = x0 + C;
            const T *BNCY_RESTRICT x2 = x1 + C, *BNCY_RESTRICT x3 = x2 + C;
            T *BNCY_RESTRICT y0 = yf + k0 + r * C, *BNCY_RESTRICT y1 = y0 + C;
            T *BNCY_RESTRICT y2 = y1 + C, *BNCY_RESTRICT y3 = y2 + C;
            /* the four loads before the four stores: with rows of 4 KiB (and y at x's offset
               in a page), a load of the next row after a store to this one would share its
               low 12 address bits, and wait for the store (4K aliasing) */
            BNCY_IVDEP for (k = 0; k < C; k++) {
                const CT h = hr[k], s = ar[k], t = br[k];
                const CT v0 = LOAD(x0 + k), v1 = LOAD(x1 + k);
                const CT v2 = LOAD(x2 + k), v3 = LOAD(x3 + k);
                STORE(y0 + k, (v0 - h) * s + t);
                STORE(y1 + k, (v1 - h) * s + t);
                STORE(y2 + k, (v2 - h) * s + t);
                STORE(y3 + k, (v3 - h) * s + t);
            }
        }
    }
    for (; r < rows; r++) {
        const T *BNCY_RESTRICT xr = xf + k0 + r * C;
        T *BNCY_RESTRICT yr = yf + k0 + r * C;
        const int64_t n = r + 1 < rows ? C : C - k0; /* the last row's first k0 are done */
        k = stream ? STREAM_ROWS(yr, xr, hr, ar, br, n) : 0;
        BNCY_IVDEP for (; k < n; k++) STORE(yr + k, (LOAD(xr + k) - hr[k]) * ar[k] + br[k]);
    }
    if (stream) BNCY_STREAM_FENCE();
}

/* The units of the parallel loops are out-of-line functions: an OpenMP region's outlined body
   may not carry the ISA attributes of its enclosing function (clang), and the serial and parallel
   paths must run the same machine code for results not to depend on the thread count. */
static BNCY_NOINLINE void FN(rows_normalize_unit)(const T *x, bncy_strides xs, T *y,
                                                  bncy_strides ys, bncy_shape sh, const CT *hi,
                                                  const CT *a, const CT *b, int64_t p0,
                                                  int64_t p1, int unit) {
    if (unit)
        FN(rows_normalize_impl)(x, xs, y, ys, sh, hi, a, b, p0, p1, 1);
    else
        FN(rows_normalize_impl)(x, xs, y, ys, sh, hi, a, b, p0, p1, 0);
}

/* Unit u of the planes elementwise passes: with nb > 0, (o, c, block of BNCY_ELEM_BLOCK along
   the inner dim), nb blocks per plane; with nb < 0, -nb whole (o, c) planes (short inner dims). */
BNCY_INLINE void FN(plane_range)(int64_t u, int64_t nb, bncy_shape sh, int64_t *q0, int64_t *q1,
                                 int64_t *i0, int64_t *n) {
    if (nb > 0) {
        *q0 = u / nb;
        *q1 = *q0 + 1;
        *i0 = (u % nb) * BNCY_ELEM_BLOCK;
        *n = bncy_min64(BNCY_ELEM_BLOCK, sh.inner - *i0);
    } else {
        *q0 = u * -nb;
        *q1 = bncy_min64(sh.outer * sh.chan, *q0 - nb);
        *i0 = 0;
        *n = sh.inner;
    }
}

/* One run of n positions of a plane (unit: unit inner strides, the only case that streams). */
BNCY_INLINE void FN(plane_normalize_one)(const T *xp, bncy_strides xs, T *yp, bncy_strides ys,
                                         int64_t n, CT hi, CT a, CT b, int unit, int stream) {
    if (unit)
        FN(plane_normalize_impl)(xp, 1, yp, 1, n, hi, a, b, stream);
    else
        FN(plane_normalize_impl)(xp, xs.inner, yp, ys.inner, n, hi, a, b, 0);
}

static BNCY_NOINLINE void FN(plane_normalize_unit)(const T *x, bncy_strides xs, T *y,
                                                   bncy_strides ys, bncy_shape sh, const CT *hi,
                                                   const CT *a, const CT *b, int64_t u,
                                                   int64_t nb, int unit, int stream) {
    int64_t q0, q1, i0, n, q;
    FN(plane_range)(u, nb, sh, &q0, &q1, &i0, &n);
    for (q = q0; q < q1; q++) {
        const int64_t c = q % sh.chan, o = q / sh.chan;
        const T *xp = x + o * xs.outer + c * xs.chan + i0 * xs.inner;
        T *yp = y + o * ys.outer + c * ys.chan + i0 * ys.inner;
        FN(plane_normalize_one)(xp, xs, yp, ys, n, hi[c], a[c], b[c], unit, stream);
    }
    if (unit && stream) BNCY_STREAM_FENCE();
}

/* Lanes of one aligned vector store: the elements of BNCY_ALIGN bytes. */
#define BNCY_VLANES ((int64_t)(BNCY_ALIGN / sizeof(T)))

/* Whether the planes of x and y follow each other in memory (unit inner strides, each plane
   inner elements after the last) and are at least one vector long: then a run of whole planes is
   one flat array, walked by plane_flat_normalize_unit. */
BNCY_INLINE int FN(planes_flat)(bncy_shape sh, bncy_strides xs, bncy_strides ys) {
    const int64_t L = sh.inner, CL = sh.chan * sh.inner;
    return xs.inner == 1 && ys.inner == 1 && xs.chan == L && ys.chan == L &&
           (sh.outer == 1 || (xs.outer == CL && ys.outer == CL)) && L >= BNCY_VLANES;
}

/* Planes [q0, q1) (q = o * chan + c) of arrays with planes_flat, as one flat run of elements
   whose vector stores all start at aligned addresses (like rows_flat_normalize_unit for rows):
   the first elements up to an aligned output address, then whole aligned vectors, each within
   one plane except the one that straddles two planes, whose lanes take the constants of their
   own plane. Every element gets the arithmetic of plane_normalize_impl with its plane's
   constants, so the results are the same. With stream, the whole vectors within a plane are
   streamed (the planes are shorter than plane_normalize_impl streams on its own). */
static BNCY_NOINLINE void FN(plane_flat_normalize_unit)(const T *x, T *y, bncy_shape sh,
                                                        const CT *BNCY_RESTRICT hi,
                                                        const CT *BNCY_RESTRICT a,
                                                        const CT *BNCY_RESTRICT b, int64_t u,
                                                        int64_t nb, int stream) {
    const int64_t L = sh.inner, C = sh.chan, V = BNCY_VLANES;
    int64_t q0, q1, i0, len, i, j, q, c;
    const T *BNCY_RESTRICT xf;
    T *BNCY_RESTRICT yf;
    int64_t n;
    FN(plane_range)(u, nb, sh, &q0, &q1, &i0, &len);
    xf = x + q0 * L;
    yf = y + q0 * L;
    n = (q1 - q0) * L;
    i = bncy_peel(yf, (int64_t)sizeof(T), n); /* < V <= L: all in the first plane */
    c = q0 % C;
    for (j = 0; j < i; j++) STORE(yf + j, (LOAD(xf + j) - hi[c]) * a[c] + b[c]);
    stream = stream && (uintptr_t)(yf + i) % BNCY_ALIGN == 0; /* then every vector is aligned */
    for (q = 0; i + V <= n; q++) {
        const int64_t end = (q + 1) * L; /* the end of plane q of the run */
        const int64_t vend = i + (end - i) / V * V;
        const CT h = hi[c], s = a[c], t = b[c];
        j = stream ? i + STREAM_PLANE(yf + i, xf + i, h, s, t, vend - i) : i;
        BNCY_IVDEP for (; j < vend; j++) STORE(yf + j, (LOAD(xf + j) - h) * s + t);
        i = vend;
        c = c + 1 == C ? 0 : c + 1; /* the channel of plane q + 1 */
        if (i < end) { /* a vector over the last r elements of plane q and the next plane's */
            const int64_t r = end - i;
            const CT h1 = hi[c], s1 = a[c], t1 = b[c];
            int64_t l;
            if (i + V > n) break; /* no next plane: the last elements, below */
            BNCY_LANE_LOOP for (l = 0; l < V; l++) {
                const int first = l < r;
                STORE(yf + i + l,
                      (LOAD(xf + i + l) - (first ? h : h1)) * (first ? s : s1) + (first ? t : t1));
            }
            i += V;
        }
    }
    for (; i < n; i++) { /* fewer than V elements at the end of the run */
        c = (q0 + i / L) % C;
        STORE(yf + i, (LOAD(xf + i) - hi[c]) * a[c] + b[c]);
    }
    if (stream) BNCY_STREAM_FENCE();
}

/* Whether the normalize can take the flat rows walk. */
BNCY_INLINE int FN(norm_flat)(bncy_shape sh, bncy_strides xs, bncy_strides ys) {
    return bncy_flat_rows(sh, xs) && bncy_flat_rows(sh, ys) && FN(rows_alignable)(sh);
}

/* The walk of an elementwise pass writing out: flat where flat is set (the flat rows walk
   applies and its rotated constants have room), else rows or planes by x's family. n_in: the
   arrays it reads, each of out's size (FN(streams)); unit_rows / unit_planes: every array has
   unit channel / inner strides; short_flat: runs of short planes may be walked flat
   (FN(planes_flat) holds). */
static bncy_walk FN(walk_setup)(const T *out, bncy_shape sh, bncy_strides xs, int n_in,
                                int flat, int unit_rows, int unit_planes, int short_flat) {
    const int64_t C = sh.chan, M = sh.outer * sh.inner;
    bncy_walk w;
    w.stream = FN(streams)(sh, n_in);
    w.four = 0;
    w.k0 = w.nb = 0;
    w.rows = bncy_max64(1, BNCY_ELEM_BLOCK / C);
    w.n_units = bncy_cdiv(M, w.rows);
    if (flat) {
        w.mode = BNCY_WALK_FLAT;
        w.unit = 1;
        w.k0 = bncy_peel(out, (int64_t)sizeof(T), C);
        w.stream = w.stream && (uintptr_t)(out + w.k0) % BNCY_ALIGN == 0;
        w.four = !w.stream && FN(pass_in_cache)(sh, n_in);
    } else if (bncy_choose_family(sh, xs) == BNCY_ROWS) {
        w.mode = BNCY_WALK_ROWS;
        w.unit = unit_rows;
        w.stream = 0;
    } else { /* units: (o, c, block of the inner dim), or runs of whole planes */
        w.nb = bncy_plane_blocks(sh);
        w.n_units = bncy_plane_units(sh, w.nb);
        w.unit = unit_planes;
        w.mode = w.nb < 0 && short_flat ? BNCY_WALK_PLANES_FLAT : BNCY_WALK_PLANES;
    }
    return w;
}

/* The walk of the normalize; flat: FN(norm_flat) holds and the rotated constants have room. */
static bncy_walk FN(norm_setup)(const T *y, bncy_shape sh, bncy_strides xs, bncy_strides ys,
                                int flat) {
    bncy_walk w = FN(walk_setup)(y, sh, xs, 1, flat, xs.chan == 1 && ys.chan == 1,
                                 xs.inner == 1 && ys.inner == 1, FN(planes_flat)(sh, xs, ys));
    w.four = w.four && FN(rows_by_four)(sh.chan);
    return w;
}

/* This thread's share of the normalize, inside a BNCY_TEAM (no barrier after it). k = [hi | a |
   b], each of length C; kr the same rotated by the walk's k0 (flat walk only). */
static void FN(norm_units)(const bncy_walk *w, const T *x, bncy_strides xs, T *y,
                           bncy_strides ys, bncy_shape sh, const CT *k, const CT *kr) {
    const int64_t C = sh.chan, M = sh.outer * sh.inner, rows = w->rows;
    const CT *hi = k, *a = k + C, *b = k + 2 * C;
    int64_t u;
    if (w->mode == BNCY_WALK_FLAT) { /* aligned (and maybe streamed) vector stores */
        BNCY_TEAM_TAIL_FIRST(w->n_units, {
            const int64_t p0 = u * rows;
            FN(rows_flat_normalize_unit)(x, y, C, w->k0, hi, a, b, kr, kr + C, kr + 2 * C, p0,
                                         bncy_min64(M, p0 + rows), w->stream, w->four);
        });
    } else if (w->mode == BNCY_WALK_ROWS) {
        BNCY_TEAM_TAIL_FIRST(w->n_units, {
            const int64_t p0 = u * rows;
            FN(rows_normalize_unit)(x, xs, y, ys, sh, hi, a, b, p0, bncy_min64(M, p0 + rows),
                                    w->unit);
        });
    } else if (w->mode == BNCY_WALK_PLANES_FLAT) { /* runs of short planes */
        BNCY_TEAM_FOR(u, w->n_units, {
            FN(plane_flat_normalize_unit)(x, y, sh, hi, a, b, u, w->nb, w->stream);
        });
    } else {
        BNCY_TEAM_FOR(u, w->n_units, {
            FN(plane_normalize_unit)(x, xs, y, ys, sh, hi, a, b, u, w->nb, w->unit, w->stream);
        });
    }
}

/* The normalize's scales s[c] = gamma[c] / sqrt(var[c] + eps) (gamma NULL: 1) of n channels:
   gamma * bncy_rsqrt_newton(var + eps), within a few double ulps of the quotient (so the scale
   in the compute type is the rounded quotient but where that lies within ~1e-15 of a tie), in a
   loop that vectorizes; a variance outside the range of the estimate (0, subnormal, Inf, NaN,
   negative) takes the quotient itself. One function for every normalize, so that the training
   forward, the inference and the synchronized paths agree. */
static void FN(affine_scales)(double *BNCY_RESTRICT s, const double *BNCY_RESTRICT gamma,
                              const double *BNCY_RESTRICT var, double eps, int64_t n) {
    int64_t c, odd = 0;
    if (gamma) {
        BNCY_IVDEP for (c = 0; c < n; c++) {
            const double v = var[c] + eps;
            s[c] = gamma[c] * bncy_rsqrt_newton(v);
            odd += !bncy_rsqrt_in_range(v);
        }
    } else {
        BNCY_IVDEP for (c = 0; c < n; c++) {
            const double v = var[c] + eps;
            s[c] = bncy_rsqrt_newton(v);
            odd += !bncy_rsqrt_in_range(v);
        }
    }
    for (c = 0; odd && c < n; c++) {
        const double v = var[c] + eps;
        if (!bncy_rsqrt_in_range(v)) s[c] = (gamma ? gamma[c] : 1.0) / sqrt(v);
    }
}

/* Channels [c0, c1) of a normalize's per-channel work: the scale (gamma / sqrt(var + eps) where
   var is given, into sbuf; else the given scale), the constants k = [hi | a | b] and their
   rotated copy rot (flat walk; NULL otherwise). */
static void FN(norm_chan_range)(int64_t C, int64_t c0, int64_t c1, const double *mean,
                                const double *scale, const double *var, const double *gamma,
                                double eps, const double *shift, double *sbuf, CT *k, CT *rot,
                                int64_t k0) {
    if (var) {
        FN(affine_scales)(sbuf + c0, gamma ? gamma + c0 : NULL, var + c0, eps, c1 - c0);
        scale = sbuf;
    }
    FN(make_consts)(k + c0, k + C + c0, k + 2 * C + c0, c1 - c0, mean + c0, scale + c0,
                    shift ? shift + c0 : NULL);
    if (rot) FN(rotate_consts_range)(rot, k, C, k0, c0, c1, 3);
}

/* Whether each thread of an elementwise pass computes every channel's constants itself (into a
   scratch of its own) rather than a share of them for all: where the walk gives every thread
   whole rows (so each reads every channel's constants), a few channels and enough rows per
   thread. Reading constants another core wrote costs more per channel than computing them: on
   the first machine, a normalize of (256, 1024) float32 on two threads took 18.4 us with shared
   constants and 16.0 us with its own in each thread (C harness). The constants are the same
   either way (each channel's are computed alone, by the same code). */
BNCY_INLINE int FN(consts_per_thread)(const bncy_walk *w, bncy_shape sh, int nt) {
    return nt > 1 && (w->mode == BNCY_WALK_FLAT || w->mode == BNCY_WALK_ROWS) &&
           sh.chan <= BNCY_LOCAL_CONSTS_MAX && sh.outer * sh.inner >= BNCY_LOCAL_CONSTS_ROWS * nt;
}

/* The bytes of one set of a normalize's scratch: the scale (doubles, with var), then
   [hi | a | b] and their rotated copy (flat walk), each aligned, wherever in a line the set
   starts; a whole number of lines, so that per-thread sets share none. */
BNCY_INLINE size_t FN(norm_scratch_bytes)(int64_t C, int with_var, int flat) {
    const size_t n = (size_t)(with_var ? C : 0) * sizeof(double) +
                     (size_t)((flat ? 6 : 3) * C) * sizeof(CT) + 3 * BNCY_ALIGN;
    return (n + BNCY_ALIGN - 1) / BNCY_ALIGN * BNCY_ALIGN;
}

/* y = (x - mean) * scale + shift, or with var given (scale NULL) the affine inference
   y = (x - mean) * gamma / sqrt(var + eps) + shift: the per-channel constants (split by
   channels, or all of them in every thread: FN(consts_per_thread)), then the elementwise pass,
   in one parallel region. */
static int FN(normalize_team)(const T *x, bncy_strides xs, T *y, bncy_strides ys, bncy_shape sh,
                              const double *mean, const double *scale, const double *var,
                              const double *gamma, double eps, const double *shift,
                              int n_threads) {
    const int64_t C = sh.chan, M = sh.outer * sh.inner;
    const int64_t n_chunks = bncy_cdiv(C, BNCY_CONSTS_CHUNK);
    const int nt = bncy_threads_for(M * C, n_threads);
    const int flat = FN(norm_flat)(sh, xs, ys);
    const size_t set_bytes = FN(norm_scratch_bytes)(C, var != NULL, flat);
    bncy_walk w;
    int local;
    char *scratch;
    if (M == 0 || C == 0) return BNCY_OK;
    w = FN(norm_setup)(y, sh, xs, ys, flat);
    local = FN(consts_per_thread)(&w, sh, nt);
    scratch = (char *)malloc(set_bytes * (size_t)(local ? nt : 1));
    if (!scratch) return BNCY_ERR_NOMEM;
    BNCY_TEAM(nt, {
        /* this thread's set (its own, or the one all share) */
        double *sbuf = (double *)bncy_align_up(scratch + (local ? bncy_team_rank() : 0) *
                                                             set_bytes);
        CT *k = (CT *)bncy_align_up(sbuf + (var ? C : 0));
        CT *rot = flat ? (CT *)bncy_align_up(k + 3 * C) : NULL;
        int64_t u;
        if (local) {
            FN(norm_chan_range)(C, 0, C, mean, scale, var, gamma, eps, shift, sbuf, k, rot, w.k0);
        } else {
            BNCY_TEAM_FOR(u, n_chunks, {
                const int64_t c0 = u * BNCY_CONSTS_CHUNK;
                FN(norm_chan_range)(C, c0, bncy_min64(C, c0 + BNCY_CONSTS_CHUNK), mean, scale,
                                    var, gamma, eps, shift, sbuf, k, rot, w.k0);
            });
        }
        FN(norm_units)(&w, x, xs, y, ys, sh, k, rot);
    });
    free(scratch);
    return BNCY_OK;
}

int FN(bncy_normalize)(const T *x, bncy_strides xs, T *y, bncy_strides ys, bncy_shape sh,
                       const double *mean, const double *scale, const double *shift,
                       int n_threads) {
    if (sh.outer < 0 || sh.chan < 0 || sh.inner < 0) return BNCY_ERR_ARG;
    return FN(normalize_team)(x, xs, y, ys, sh, mean, scale, NULL, NULL, 0.0, shift, n_threads);
}

/* scale = gamma / sqrt(var + eps), shift = beta, in double. */
static int FN(affine_normalize)(const T *x, bncy_strides xs, T *y, bncy_strides ys,
                                bncy_shape sh, const double *mean, const double *var,
                                const double *gamma, const double *beta, double eps,
                                int n_threads) {
    return FN(normalize_team)(x, xs, y, ys, sh, mean, NULL, var, gamma, eps, beta, n_threads);
}

int FN(bncy_batch_norm)(const T *x, bncy_strides xs, T *y, bncy_strides ys, bncy_shape sh,
                        const double *mean, const double *var, const double *gamma,
                        const double *beta, double eps, int n_threads) {
    if (sh.outer < 0 || sh.chan < 0 || sh.inner < 0) return BNCY_ERR_ARG;
    return FN(affine_normalize)(x, xs, y, ys, sh, mean, var, gamma, beta, eps, n_threads);
}

/* ---------------------------------------------------------------------------------------------
 * Fused passes for planes (channels-first layouts): one block of channels at a time, first its
 * reduction and then its elementwise pass, so the second read of the block's inputs comes from
 * the cache instead of memory (the separate passes read the whole inputs twice). Every channel
 * is computed by the functions of the separate passes in the same order, so the results are
 * bitwise the same for any block size and thread count; only the order of the memory walk
 * changes. Used where one channel's inputs fit BNCY_FUSED_CHAN_BYTES, its planes are at least
 * BNCY_FUSED_PLANE_MIN_BYTES long and there are enough blocks to share between the threads.
 * ------------------------------------------------------------------------------------------- */
#ifndef BNCY_FUSED_CHAN_BYTES /* fused only when a channel's inputs fit this */
#define BNCY_FUSED_CHAN_BYTES (1024.0 * 1024)
#endif
#ifndef BNCY_FUSED_BLOCK_BYTES /* channels per unit: about this much input */
#define BNCY_FUSED_BLOCK_BYTES (512.0 * 1024)
#endif
/* Fused only on planes at least this long. A block reads each channel's planes one after the
   other, one per outer index, so short planes make short runs of lines far apart, which the
   hardware prefetchers do not follow; the separate passes walk the same data in memory order.
   On a 2-core Zen 3 VM (32 MiB L3, 512 KiB L2), float32, best of 4 alternated runs of a C
   harness, separate passes against fused: (64, 256, 128) axis=1 backward 1.60 against 2.65 ms at
   1 thread, 0.59 against 1.02 ms at 2, training 0.84 against 1.00 ms at 1 thread (0.54 both at
   2); (256, 256, 128) training at 2 threads 2.6 against 5.6 ms; planes of 1 - 4 KiB
   ((64, 128, 256), (64, 64, 512), (32, 64, 1024)) backward 0.64 - 0.86x the fused time; 6 KiB
   (16, 64, 1536) 0.93x; from 8 KiB on the fused walk is faster: (16, 64, 2048) 1.10x,
   (8, 64, 4096) 1.13 - 1.22x, (8, 64, 3136) 1.30 - 1.35x. */
#ifndef BNCY_FUSED_PLANE_MIN_BYTES
#define BNCY_FUSED_PLANE_MIN_BYTES 8192.0
#endif
#define BNCY_FUSED_CBLOCK_MAX 64

/* Channels per fused unit for this shape, or 0 where the fused walk does not apply; n_in is the
   number of inputs read twice (x for the training forward, x and dy for the backward). */
static int64_t FN(fused_cblock)(bncy_shape sh, bncy_strides xs, int n_in, int n_threads) {
    const double chan_bytes = (double)n_in * (double)(sh.outer * sh.inner) * sizeof(T);
    int64_t cb, units;
    if (sh.chan < 2 || sh.inner < 2 || bncy_choose_family(sh, xs) != BNCY_PLANES) return 0;
    if (chan_bytes > BNCY_FUSED_CHAN_BYTES) return 0;
    if ((double)sh.inner * sizeof(T) < BNCY_FUSED_PLANE_MIN_BYTES) return 0;
    cb = bncy_max64(1, bncy_min64((int64_t)(BNCY_FUSED_BLOCK_BYTES / chan_bytes),
                                  BNCY_FUSED_CBLOCK_MAX));
    units = bncy_cdiv(sh.chan, cb);
    /* the units are split statically between the threads: enough of them to balance */
    if (n_threads > 1 && units < 4 * (int64_t)n_threads) return 0;
    return cb;
}

/* Training forward of channels [c0, c0 + nc): the statistics of bncy_moments (the planes units
   of stats_unit restricted to these channels, merged by merge_groups in group order; part holds
   3 * G * nc doubles), then the constants of affine_normalize and plane_normalize_unit's
   elementwise pass. */
static BNCY_NOINLINE void FN(train_fused_unit)(const T *x, bncy_strides xs, T *y, bncy_strides ys,
                                               bncy_shape sh, const CT *mask,
                                               const double *gamma, const double *beta,
                                               double eps, const bncy_plan *plan, int64_t c0,
                                               int64_t nc, double *part, double *mean,
                                               double *var, int stream) {
    const int64_t G = plan->n_groups;
    const int unit = xs.inner == 1 && ys.inner == 1;
    const int pf = (double)plan->M * (double)sh.chan * sizeof(T) >= BNCY_PREFETCH_MIN_BYTES;
    const T *xb = x + c0 * xs.chan;
    bncy_shape shb = sh;
    double w[BNCY_FUSED_CBLOCK_MAX], scale[BNCY_FUSED_CBLOCK_MAX];
    CT hi[BNCY_FUSED_CBLOCK_MAX], a[BNCY_FUSED_CBLOCK_MAX], b[BNCY_FUSED_CBLOCK_MAX];
    int64_t g, c, o;
    shb.chan = nc; /* the planes kernels take the channels in turn: a block is a narrower x */
    for (g = 0; g < G; g++) {
        const int64_t p0 = g * plan->group_len, p1 = bncy_min64(plan->M, p0 + plan->group_len);
        FN(planes_stats_unit)(xb, xs, shb, mask, p0, p1, part + g * nc, part + (G + g) * nc,
                              part + (2 * G + g) * nc, pf);
    }
    FN(merge_groups)(part, G, nc, nc, w, mean + c0, var + c0, 1);
    FN(affine_scales)(scale, gamma ? gamma + c0 : NULL, var + c0, eps, nc);
    FN(make_consts)(hi, a, b, nc, mean + c0, scale, beta ? beta + c0 : NULL);
    for (o = 0; o < sh.outer; o++)
        for (c = 0; c < nc; c++)
            FN(plane_normalize_one)(x + o * xs.outer + (c0 + c) * xs.chan, xs,
                                    y + o * ys.outer + (c0 + c) * ys.chan, ys, sh.inner, hi[c],
                                    a[c], b[c], unit, stream);
    if (unit && stream) BNCY_STREAM_FENCE();
}

static int FN(train_fused)(const T *x, bncy_strides xs, T *y, bncy_strides ys, bncy_shape sh,
                           const CT *mask, const double *gamma, const double *beta, double eps,
                           double *mean, double *var, int64_t cb, int n_threads) {
    const int64_t C = sh.chan, n_units = bncy_cdiv(C, cb);
    const bncy_plan plan = bncy_make_plan(sh, xs);
    const int nt = bncy_threads_for(plan.M * C, n_threads), stream = FN(streams)(sh, 1);
    /* each unit's partials, [w | mean | m2] x G x (its channels), at 3 * G * c0 */
    double *part = (double *)malloc((size_t)(3 * plan.n_groups * C) * sizeof(double));
    int64_t u;
    if (!part) return BNCY_ERR_NOMEM;
    BNCY_PARALLEL_FOR(nt, u, n_units, {
        const int64_t c0 = u * cb;
        FN(train_fused_unit)(x, xs, y, ys, sh, mask, gamma, beta, eps, &plan, c0,
                             bncy_min64(cb, C - c0), part + 3 * plan.n_groups * c0, mean, var,
                             stream);
    });
    free(part);
    return BNCY_OK;
}

/* Channels [c0, c1) of the separate-pass training forward's per-channel work: the statistics
   merged from the group partials (as bncy_moments), the scale (as affine_normalize), the
   constants k = [hi | a | b] and their rotated copy rot (flat walk; NULL otherwise). */
static void FN(train_chan_range)(const double *part, int64_t G, int64_t C, int64_t c0,
                                 int64_t c1, const double *gamma, const double *beta, double eps,
                                 double *mean, double *var, double *wsum, double *scale, CT *k,
                                 CT *rot, int64_t k0) {
    FN(merge_groups)(part + c0, G, C, c1 - c0, wsum + c0, mean + c0, var + c0, 1);
    FN(norm_chan_range)(C, c0, c1, mean, NULL, var, gamma, eps, beta, scale, k, rot, k0);
}

/* The training forward in separate passes, all in one parallel region (as backward_team): the
   statistics' group partials (stats_unit, split as in bncy_moments_partial), each channel's
   statistics and constants (split by channels), then the normalize (the walk of bncy_normalize,
   split as there). The same results as bncy_moments followed by bncy_batch_norm. */
static int FN(train_team)(const T *x, bncy_strides xs, T *y, bncy_strides ys, bncy_shape sh,
                          const CT *mask, const double *gamma, const double *beta, double eps,
                          double *mean, double *var, int n_threads) {
    const int64_t C = sh.chan;
    const bncy_plan plan = bncy_make_plan(sh, xs);
    const int64_t G = plan.n_groups, n_chunks = bncy_cdiv(C, BNCY_CONSTS_CHUNK);
    const int flat = FN(norm_flat)(sh, xs, ys);
    const int nt = bncy_threads_for(plan.M * C, n_threads);
    /* the partials [w | mean | m2] (G x C each), wsum, scale (doubles), then the constants
       [hi | a | b] and their rotated copy, each aligned */
    double *part = (double *)malloc((size_t)((3 * G + 2) * C) * sizeof(double) +
                                    (size_t)((flat ? 6 : 3) * C) * sizeof(CT) + 2 * BNCY_ALIGN);
    double *wsum, *scale;
    CT *k, *rot;
    bncy_walk w;
    if (!part) return BNCY_ERR_NOMEM;
    wsum = part + 3 * G * C;
    scale = wsum + C;
    k = (CT *)bncy_align_up(scale + C);
    rot = flat ? (CT *)bncy_align_up(k + 3 * C) : NULL;
    w = FN(norm_setup)(y, sh, xs, ys, flat);
    BNCY_TEAM(nt, {
        int64_t u;
        BNCY_TEAM_FOR(u, plan.n_units, { FN(stats_unit)(x, xs, sh, mask, &plan, part, u); });
        BNCY_TEAM_FOR(u, n_chunks, {
            const int64_t c0 = u * BNCY_CONSTS_CHUNK;
            FN(train_chan_range)(part, G, C, c0, bncy_min64(C, c0 + BNCY_CONSTS_CHUNK), gamma,
                                 beta, eps, mean, var, wsum, scale, k, rot, w.k0);
        });
        FN(norm_units)(&w, x, xs, y, ys, sh, k, rot);
    });
    free(part);
    return BNCY_OK;
}

int FN(bncy_batch_norm_train)(const T *x, bncy_strides xs, T *y, bncy_strides ys, bncy_shape sh,
                              const CT *mask, const double *gamma, const double *beta,
                              double eps, double *mean, double *var, int n_threads) {
    int status;
    if (sh.outer < 0 || sh.chan < 0 || sh.inner < 0) return BNCY_ERR_ARG;
    if (sh.outer > 0 && sh.chan > 0) {
        const int64_t cb = FN(fused_cblock)(sh, xs, 1, n_threads);
        if (cb > 0)
            return FN(train_fused)(x, xs, y, ys, sh, mask, gamma, beta, eps, mean, var, cb,
                                   n_threads);
    }
    if (sh.outer > 0 && sh.inner > 0 && sh.chan > 0)
        return FN(train_team)(x, xs, y, ys, sh, mask, gamma, beta, eps, mean, var, n_threads);
    status = FN(bncy_moments)(x, xs, sh, mask, mean, var, n_threads);
    if (status != BNCY_OK) return status;
    return FN(affine_normalize)(x, xs, y, ys, sh, mean, var, gamma, beta, eps, n_threads);
}

/* ---------------------------------------------------------------------------------------------
 * Backward. Pass 1 reduces sum(dy) and sum(dy * (x - mean)) per channel (over every position,
 * masked or not), with the same fixed grouping as the statistics. Pass 2 writes
 *   dx = A*dy - w*(B + (x - mean)*K)          (training; w = 1 without a mask)
 *   dx = A*dy                                 (inference)
 * with A = g*inv, B = g*inv*sum(dy)/W, K = g*inv^3*sum(dy*(x-mean))/W.
 * ------------------------------------------------------------------------------------------- */
/* Four rows of backward pass 1 (dr/xr: their rows of dy and x), channels innermost: their sums
   of dy and of dy * (x - hi) in the compute type, left in ta/tb (first) or added to ta/tb and
   the result into the double sums (last). */
BNCY_INLINE void FN(four_grad_sums)(const T *const *dr, const T *const *xr,
                                    const CT *BNCY_RESTRICT hi, int64_t nc,
                                    CT *BNCY_RESTRICT ta, CT *BNCY_RESTRICT tb,
                                    double *BNCY_RESTRICT sdy, double *BNCY_RESTRICT sdyx,
                                    const int last) {
    const T *BNCY_RESTRICT d0p = dr[0], *BNCY_RESTRICT d1p = dr[1];
    const T *BNCY_RESTRICT d2p = dr[2], *BNCY_RESTRICT d3p = dr[3];
    const T *BNCY_RESTRICT x0p = xr[0], *BNCY_RESTRICT x1p = xr[1];
    const T *BNCY_RESTRICT x2p = xr[2], *BNCY_RESTRICT x3p = xr[3];
    int64_t c;
    BNCY_IVDEP for (c = 0; c < nc; c++) {
        const CT h = hi[c];
        const CT g0 = LOAD(d0p + c), g1 = LOAD(d1p + c), g2 = LOAD(d2p + c), g3 = LOAD(d3p + c);
        const CT e0 = LOAD(x0p + c) - h, e1 = LOAD(x1p + c) - h;
        const CT e2 = LOAD(x2p + c) - h, e3 = LOAD(x3p + c) - h;
        const CT a = (g0 + g1) + (g2 + g3), b = (g0 * e0 + g1 * e1) + (g2 * e2 + g3 * e3);
        if (last) {
            sdy[c] += (double)(ta[c] + a);
            sdyx[c] += (double)(tb[c] + b);
        } else {
            ta[c] = a;
            tb[c] = b;
        }
    }
}

/* Eight positions of backward pass 1 (kept out of line; see row helpers), nc <= BNCY_CBLOCK_MAX:
   two walks of four rows over the channels, the first leaving its sums of four in ta/tb (in
   L1), the second adding its own to them and the result into the double sums. That is the tree
   of eight of one walk, so the same bits, with eight rows' pointers live in a walk instead of
   sixteen, which do not fit the x86-64 registers (one walk of eight spilled pointers and vectors
   to the stack). */
static BNCY_NOINLINE void FN(oct_grad_sums)(const T *const *dr, const T *const *xr,
                                            const CT *BNCY_RESTRICT hi, int64_t nc,
                                            double *BNCY_RESTRICT sdy,
                                            double *BNCY_RESTRICT sdyx) {
    CT ta[BNCY_CBLOCK_MAX], tb[BNCY_CBLOCK_MAX];
    FN(four_grad_sums)(dr, xr, hi, nc, ta, tb, sdy, sdyx, 0);
    FN(four_grad_sums)(dr + 4, xr + 4, hi, nc, ta, tb, sdy, sdyx, 1);
}

/* Backward pass 1 sums: sdy = sum(dy), sdyx = sum(dy * (x - mean)). As in the statistics,
   eight positions are combined in the compute type, with the mean's high part hi subtracted
   there, and added into double accumulators; the low part is applied at the end:
   sum(dy * (x - mean)) = sum(dy * (x - hi)) - (mean - hi) * sum(dy). */
BNCY_INLINE void FN(rows_grad_sums_impl)(const T *dy, bncy_strides dys, const T *x,
                                         bncy_strides xs, bncy_shape sh,
                                         const double *BNCY_RESTRICT mean, int64_t p0, int64_t p1,
                                         int64_t c0, int64_t nc, double *BNCY_RESTRICT sdy,
                                         double *BNCY_RESTRICT sdyx, const int unit_chan) {
    const int64_t sxc = unit_chan ? 1 : xs.chan, sdc = unit_chan ? 1 : dys.chan;
    FN(bncy_pos) qx = FN(pos_at)(p0, sh, xs), qd = FN(pos_at)(p0, sh, dys);
    CT hi[BNCY_CBLOCK_MAX];
    int64_t p = p0, c, j, redo;
    for (c = 0; c < nc; c++) {
        sdy[c] = sdyx[c] = 0.0;
        hi[c] = (CT)mean[c0 + c];
    }
    if (unit_chan) {
        for (; p + 8 <= p1; p += 8) {
            const T *xr[8], *dr[8];
            for (j = 0; j < 8; j++) {
                xr[j] = x + qx.off + c0;
                dr[j] = dy + qd.off + c0;
                FN(pos_next)(&qx, sh, xs);
                FN(pos_next)(&qd, sh, dys);
            }
            FN(oct_grad_sums)(dr, xr, hi, nc, sdy, sdyx);
        }
    }
    for (; p < p1; p++) {
        const T *BNCY_RESTRICT xr = x + qx.off + c0 * sxc;
        const T *BNCY_RESTRICT dr = dy + qd.off + c0 * sdc;
        for (c = 0; c < nc; c++) {
            const double g = (double)LOAD(dr + c * sdc);
            sdy[c] += g;
            sdyx[c] += g * (double)(LOAD(xr + c * sxc) - hi[c]);
        }
        FN(pos_next)(&qx, sh, xs);
        FN(pos_next)(&qd, sh, dys);
    }
    redo = 0;
    BNCY_IVDEP for (c = 0; c < nc; c++) /* a branch-free count of Inf/NaN sums */
        redo += (sdy[c] - sdy[c] != 0.0) | (sdyx[c] - sdyx[c] != 0.0);
    if (!redo) { /* the usual case: only the low part of the mean to apply */
        BNCY_IVDEP for (c = 0; c < nc; c++) {
            const double lo = mean[c0 + c] - (double)hi[c];
            sdyx[c] -= lo != 0.0 ? lo * sdy[c] : 0.0;
        }
        return;
    }
    for (c = 0; c < nc; c++) {
        const double lo = mean[c0 + c] - (double)hi[c];
        if (!isfinite(sdy[c]) || !isfinite(sdyx[c])) {
            /* compute-type products or sums overflowed (or Inf/NaN data): redo in double */
            FN(bncy_pos) rx = FN(pos_at)(p0, sh, xs), rd = FN(pos_at)(p0, sh, dys);
            double a = 0.0, b = 0.0;
            for (p = p0; p < p1; p++) {
                const double g = (double)LOAD(dy + rd.off + (c0 + c) * dys.chan);
                a += g;
                b += g * ((double)LOAD(x + rx.off + (c0 + c) * xs.chan) - mean[c0 + c]);
                FN(pos_next)(&rx, sh, xs);
                FN(pos_next)(&rd, sh, dys);
            }
            sdy[c] = a;
            sdyx[c] = b;
        } else if (lo != 0.0) {
            sdyx[c] -= lo * sdy[c];
        }
    }
}

BNCY_INLINE void FN(planes_grad_sums_impl)(const T *dy, bncy_strides dys, const T *x,
                                           bncy_strides xs, bncy_shape sh, double m, int64_t p0,
                                           int64_t p1, int64_t c, double *sdy_out,
                                           double *sdyx_out, const int unit_inner) {
    double a[BNCY_LANES] = {0}, b[BNCY_LANES] = {0};
    const CT hi = (CT)m;
    const double lo = m - (double)hi;
    const int64_t w = 2 * BNCY_LANES, run = 8 * BNCY_LANES, q = 4 * BNCY_LANES;
    int64_t p = p0, k, l, nq;
    while (p < p1) {
        const int64_t o = p / sh.inner, i = p - o * sh.inner;
        const int64_t n = bncy_min64(p1 - p, sh.inner - i);
        const int64_t sxi = unit_inner ? 1 : xs.inner, sdi = unit_inner ? 1 : dys.inner;
        const T *xp = x + o * xs.outer + c * xs.chan + i * sxi;
        const T *dp = dy + o * dys.outer + c * dys.chan + i * sdi;
        /* runs of eight vectors of lanes as 2 * BNCY_LANES lanes, halves added lane to lane
           before the conversion (as in plane_dev_acc), then a run of four, then one by one */
        for (k = 0; k + run <= n; k += run) {
            CT ta[2 * BNCY_LANES], tb[2 * BNCY_LANES];
            BNCY_LANE_LOOP for (l = 0; l < w; l++) {
                const T *px = xp + (k + l) * sxi, *pd = dp + (k + l) * sdi;
                const CT g0 = LOAD(pd), g1 = LOAD(pd + w * sdi);
                const CT g2 = LOAD(pd + 2 * w * sdi), g3 = LOAD(pd + 3 * w * sdi);
                const CT d0 = LOAD(px) - hi, d1 = LOAD(px + w * sxi) - hi;
                const CT d2 = LOAD(px + 2 * w * sxi) - hi, d3 = LOAD(px + 3 * w * sxi) - hi;
                FN(four_sums)(g0, g1, g2, g3, d0, d1, d2, d3, &ta[l], &tb[l]);
            }
            BNCY_LANE_LOOP for (l = 0; l < BNCY_LANES; l++) {
                a[l] += (double)(ta[l] + ta[l + BNCY_LANES]);
                b[l] += (double)(tb[l] + tb[l + BNCY_LANES]);
            }
        }
        for (; k + q <= n; k += q) {
            BNCY_LANE_LOOP for (l = 0; l < BNCY_LANES; l++) {
                const T *px = xp + (k + l) * sxi, *pd = dp + (k + l) * sdi;
                const CT g0 = LOAD(pd), g1 = LOAD(pd + BNCY_LANES * sdi);
                const CT g2 = LOAD(pd + 2 * BNCY_LANES * sdi), g3 = LOAD(pd + 3 * BNCY_LANES * sdi);
                const CT d0 = LOAD(px) - hi, d1 = LOAD(px + BNCY_LANES * sxi) - hi;
                const CT d2 = LOAD(px + 2 * BNCY_LANES * sxi) - hi;
                const CT d3 = LOAD(px + 3 * BNCY_LANES * sxi) - hi;
                CT sg, gd;
                FN(four_sums)(g0, g1, g2, g3, d0, d1, d2, d3, &sg, &gd);
                a[l] += (double)sg;
                b[l] += (double)gd;
            }
        }
        for (nq = k; k < n; k++) {
            const double g = (double)LOAD(dp + k * sdi);
            a[(k - nq) % BNCY_LANES] += g;
            b[(k - nq) % BNCY_LANES] += g * (double)(LOAD(xp + k * sxi) - hi);
        }
        p += n;
    }
    *sdy_out = FN(lanes_total)(a);
    *sdyx_out = FN(lanes_total)(b) - (lo != 0.0 ? lo * *sdy_out : 0.0);
    if (!isfinite(*sdy_out) || !isfinite(*sdyx_out)) {
        /* compute-type products or sums overflowed (or Inf/NaN data): redo in double */
        double ea = 0.0, eb = 0.0;
        for (p = p0; p < p1; p++) {
            const int64_t o = p / sh.inner, i = p - o * sh.inner;
            const double g = (double)LOAD(dy + o * dys.outer + c * dys.chan + i * dys.inner);
            ea += g;
            eb += g * ((double)LOAD(x + o * xs.outer + c * xs.chan + i * xs.inner) - m);
        }
        *sdy_out = ea;
        *sdyx_out = eb;
    }
}

/* planes_grad_sums_impl of channel ch over positions [p0, p1), specialized for unit strides. */
BNCY_INLINE void FN(plane_grad_sums)(const T *dy, bncy_strides dys, const T *x, bncy_strides xs,
                                     bncy_shape sh, double m, int64_t p0, int64_t p1, int64_t ch,
                                     double *sdy, double *sdyx) {
    if (xs.inner == 1 && dys.inner == 1)
        FN(planes_grad_sums_impl)(dy, dys, x, xs, sh, m, p0, p1, ch, sdy, sdyx, 1);
    else
        FN(planes_grad_sums_impl)(dy, dys, x, xs, sh, m, p0, p1, ch, sdy, sdyx, 0);
}

/* Unit u of backward pass 1 (split as in stats_unit); part = [sum dy | sum dy*(x-mean)], each
   G x C, g-major. */
static BNCY_NOINLINE void FN(grad_sums_unit)(const T *dy, bncy_strides dys, const T *x,
                                             bncy_strides xs, bncy_shape sh, const double *mean,
                                             const bncy_plan *plan, double *part, int64_t u) {
    const int64_t G = plan->n_groups, C = sh.chan, g = u / plan->n_cblocks;
    const int64_t blk = u % plan->n_cblocks;
    const int64_t p0 = g * plan->group_len, p1 = bncy_min64(plan->M, p0 + plan->group_len);
    if (plan->family == BNCY_ROWS) {
        const int64_t c0 = blk * plan->cblock, nc = bncy_min64(plan->cblock, C - c0);
        if (xs.chan == 1 && dys.chan == 1)
            FN(rows_grad_sums_impl)(dy, dys, x, xs, sh, mean, p0, p1, c0, nc, part + g * C + c0,
                                    part + (G + g) * C + c0, 1);
        else
            FN(rows_grad_sums_impl)(dy, dys, x, xs, sh, mean, p0, p1, c0, nc, part + g * C + c0,
                                    part + (G + g) * C + c0, 0);
    } else {
        const int64_t c0 = blk * plan->cblock, c1 = bncy_min64(C, c0 + plan->cblock);
        int64_t ch;
        for (ch = c0; ch < c1; ch++)
            FN(plane_grad_sums)(dy, dys, x, xs, sh, mean[ch], p0, p1, ch, part + g * C + ch,
                                part + (G + g) * C + ch);
    }
}

/* Channels [c0, c1) of the sums from the G x C group partials part = [sum dy | sum dy*(x-mean)]
   of grad_sums_unit: each channel's groups added in order (the channel loop innermost, so it
   vectorizes). */
BNCY_INLINE void FN(grad_sums_merge)(const double *part, int64_t G, int64_t C, int64_t c0,
                                     int64_t c1, double *BNCY_RESTRICT sdy,
                                     double *BNCY_RESTRICT sdyx) {
    int64_t c, g;
    for (c = c0; c < c1; c++) sdy[c] = sdyx[c] = 0.0;
    for (g = 0; g < G; g++) {
        const double *BNCY_RESTRICT pa = part + g * C, *BNCY_RESTRICT pb = part + (G + g) * C;
        BNCY_IVDEP for (c = c0; c < c1; c++) {
            sdy[c] += pa[c];
            sdyx[c] += pb[c];
        }
    }
}

static int FN(grad_sums)(const T *dy, bncy_strides dys, const T *x, bncy_strides xs,
                         bncy_shape sh, const double *mean, double *sdy, double *sdyx,
                         int n_threads) {
    const int64_t C = sh.chan;
    bncy_plan plan;
    double *part;
    int64_t G, u, c;
    int nt;
    if (sh.outer == 0 || sh.inner == 0) {
        for (c = 0; c < C; c++) sdy[c] = sdyx[c] = 0.0;
        return BNCY_OK;
    }
    plan = bncy_make_plan(sh, xs);
    G = plan.n_groups;
    part = (double *)malloc((size_t)(2 * G * C) * sizeof(double));
    if (!part) return BNCY_ERR_NOMEM;
    nt = bncy_threads_for(plan.M * C, n_threads);
    BNCY_PARALLEL_FOR(nt, u, plan.n_units,
                      { FN(grad_sums_unit)(dy, dys, x, xs, sh, mean, &plan, part, u); });
    FN(grad_sums_merge)(part, G, C, 0, C, sdy, sdyx);
    free(part);
    return BNCY_OK;
}

/* Elementwise dx; A/B/K/inv/hi are per-channel arrays in the compute type. The centred value is
   scaled by inv before K (xhat = (x - hi) * inv, then xhat * K): K = gamma * inv^3 * sdyx / W
   taken in one factor is subnormal in float32 for variances near 1e38 and a small gamma. */
typedef struct {
    const CT *A, *B, *K, *inv, *hi;
} FN(bncy_grad_consts);

/* The training term t = B + xhat K of dx = A dy - t, with xhat = (x - hi) inv. */
BNCY_INLINE CT FN(dx_term)(CT v, CT b, CT kk, CT inv, CT hi) { return b + ((v - hi) * inv) * kk; }

BNCY_INLINE CT FN(dx_value)(CT g, CT v, CT w, int64_t c, FN(bncy_grad_consts) k,
                            const int training, const int has_mask) {
    if (!training) return k.A[c] * g;
    {
        const CT t = FN(dx_term)(v, k.B[c], k.K[c], k.inv[c], k.hi[c]);
        /* a masked-out position (w = 0) is not in the statistics: dx = A dy exactly, even
           where its own t overflows (0 * Inf would be NaN) */
        return k.A[c] * g - (has_mask ? (w != (CT)0 ? w * t : (CT)0) : t);
    }
}

BNCY_INLINE void FN(rows_dx_impl)(const T *dy, bncy_strides dys, const T *x, bncy_strides xs,
                                  T *dx, bncy_strides dxs, bncy_shape sh, const CT *mask,
                                  FN(bncy_grad_consts) k, int64_t p0, int64_t p1,
                                  const int training, const int has_mask, const int unit) {
    FN(bncy_pos) qx = FN(pos_at)(p0, sh, xs), qd = FN(pos_at)(p0, sh, dys);
    FN(bncy_pos) qo = FN(pos_at)(p0, sh, dxs);
    const int64_t sxc = unit ? 1 : xs.chan, sdc = unit ? 1 : dys.chan, soc = unit ? 1 : dxs.chan;
    int64_t p, c;
    for (p = p0; p < p1; p++) {
        const T *xr = x + qx.off, *dr = dy + qd.off;
        T *orow = dx + qo.off;
        const CT w = has_mask ? mask[p] : (CT)1;
        BNCY_IVDEP for (c = 0; c < sh.chan; c++) {
            const CT g = LOAD(dr + c * sdc);
            const CT v = training ? LOAD(xr + c * sxc) : (CT)0;
            STORE(orow + c * soc, FN(dx_value)(g, v, w, c, k, training, has_mask));
        }
        FN(pos_next)(&qx, sh, xs);
        FN(pos_next)(&qd, sh, dys);
        FN(pos_next)(&qo, sh, dxs);
    }
}

BNCY_INLINE void FN(plane_dx_impl)(const T *dp, int64_t sdi, const T *xp, int64_t sxi, T *op,
                                   int64_t soi, const CT *wp, int64_t n, int64_t c,
                                   FN(bncy_grad_consts) k, const int training,
                                   const int has_mask, const int stream) {
    int64_t i = 0;
    if (soi == 1 && FN(plane_peels)(op, n, stream)) { /* up to the first aligned output */
        const int64_t k0 = bncy_peel(op, (int64_t)sizeof(T), n);
        for (; i < k0; i++) {
            const CT g = LOAD(dp + i * sdi);
            const CT v = training ? LOAD(xp + i * sxi) : (CT)0;
            const CT w = has_mask ? wp[i] : (CT)1;
            STORE(op + i, FN(dx_value)(g, v, w, c, k, training, has_mask));
        }
        if (stream && !has_mask && sdi == 1 && sxi == 1 && (uintptr_t)(op + i) % BNCY_ALIGN == 0)
            i += STREAM_DX_PLANE(op + i, dp + i, xp + i, k.A[c], k.B[c], k.K[c], k.inv[c],
                                 k.hi[c], n - i, training);
    }
    BNCY_IVDEP for (; i < n; i++) {
        const CT g = LOAD(dp + i * sdi);
        const CT v = training ? LOAD(xp + i * sxi) : (CT)0;
        const CT w = has_mask ? wp[i] : (CT)1;
        STORE(op + i * soi, FN(dx_value)(g, v, w, c, k, training, has_mask));
    }
}

/* Rows [p0, p1) of flat rows arrays without a mask, walked as whole rows shifted by k0 (as in
   rows_flat_normalize_unit): kr holds the constants rotated by k0. */
BNCY_INLINE void FN(rows_flat_dx_impl)(const T *dy, const T *x, T *dx, int64_t C, int64_t k0,
                                       FN(bncy_grad_consts) k, FN(bncy_grad_consts) kr,
                                       int64_t p0, int64_t p1, const int training,
                                       const int stream, const int four) {
    const T *BNCY_RESTRICT df = dy + p0 * C;
    const T *BNCY_RESTRICT xf = x + p0 * C;
    T *BNCY_RESTRICT of = dx + p0 * C;
    const int64_t rows = p1 - p0;
    int64_t r, j;
    for (j = 0; j < k0; j++)
        STORE(of + j, FN(dx_value)(LOAD(df + j), training ? LOAD(xf + j) : (CT)0, (CT)1, j, k,
                                   training, 0));
    r = 0;
    if (four) { /* four whole rows at a time: each constant loaded once for four values */
        const CT *BNCY_RESTRICT A = kr.A, *BNCY_RESTRICT B = kr.B, *BNCY_RESTRICT K = kr.K;
        const CT *BNCY_RESTRICT inv = kr.inv, *BNCY_RESTRICT hi = kr.hi;
        for (; r + 4 < rows || (k0 == 0 && r + 4 <= rows); r += 4) {
            const T *BNCY_RESTRICT d0 = df + k0 + r * C, *BNCY_RESTRICT d1 = d0 + C;
            const T *BNCY_RESTRICT d2 = d1 + C, *BNCY_RESTRICT d3 = d2 + C;
            const T *BNCY_RESTRICT x0 = xf + k0 + r * C, *BNCY_RESTRICT x1 = x0 + C;
            const T *BNCY_RESTRICT x2 = x1 + C, *BNCY_RESTRICT x3 = x2 + C;
            T *BNCY_RESTRICT o0 = of + k0 + r * C, *BNCY_RESTRICT o1 = o0 + C;
            T *BNCY_RESTRICT o2 = o1 + C, *BNCY_RESTRICT o3 = o2 + C;
            /* dx_value's arithmetic; every load before the stores (4K aliasing, as in
               rows_flat_normalize_unit) */
            BNCY_IVDEP for (j = 0; j < C; j++) {
                const CT a = A[j];
                const CT g0 = LOAD(d0 + j), g1 = LOAD(d1 + j), g2 = LOAD(d2 + j), g3 = LOAD(d3 + j);
                if (training) {
                    const CT b = B[j], kk = K[j], iv = inv[j], h = hi[j];
                    const CT v0 = LOAD(x0 + j), v1 = LOAD(x1 + j);
                    const CT v2 = LOAD(x2 + j), v3 = LOAD(x3 + j);
                    STORE(o0 + j, a * g0 - FN(dx_term)(v0, b, kk, iv, h));
                    STORE(o1 + j, a * g1 - FN(dx_term)(v1, b, kk, iv, h));
                    STORE(o2 + j, a * g2 - FN(dx_term)(v2, b, kk, iv, h));
                    STORE(o3 + j, a * g3 - FN(dx_term)(v3, b, kk, iv, h));
                } else {
                    STORE(o0 + j, a * g0);
                    STORE(o1 + j, a * g1);
                    STORE(o2 + j, a * g2);
                    STORE(o3 + j, a * g3);
                }
            }
        }
    }
    for (; r < rows; r++) {
        const T *BNCY_RESTRICT dr = df + k0 + r * C;
        const T *BNCY_RESTRICT xr = xf + k0 + r * C;
        T *BNCY_RESTRICT orow = of + k0 + r * C;
        const int64_t n = r + 1 < rows ? C : C - k0; /* the last row's first k0 are done */
        j = stream ? STREAM_DX_ROWS(orow, dr, xr, kr.A, kr.B, kr.K, kr.inv, kr.hi, n, training) : 0;
        BNCY_IVDEP for (; j < n; j++) {
            const CT g = LOAD(dr + j);
            const CT v = training ? LOAD(xr + j) : (CT)0;
            STORE(orow + j, FN(dx_value)(g, v, (CT)1, j, kr, training, 0));
        }
    }
}

static BNCY_NOINLINE void FN(rows_flat_dx_unit)(const T *dy, const T *x, T *dx, int64_t C,
                                                int64_t k0, const FN(bncy_grad_consts) * k,
                                                const FN(bncy_grad_consts) * kr, int64_t p0,
                                                int64_t p1, int training, int stream,
                                                int four) {
    if (training)
        FN(rows_flat_dx_impl)(dy, x, dx, C, k0, *k, *kr, p0, p1, 1, stream, four);
    else
        FN(rows_flat_dx_impl)(dy, x, dx, C, k0, *k, *kr, p0, p1, 0, stream, four);
    if (stream) BNCY_STREAM_FENCE();
}

static BNCY_NOINLINE void FN(rows_dx_unit)(const T *dy, bncy_strides dys, const T *x,
                                           bncy_strides xs, T *dx, bncy_strides dxs,
                                           bncy_shape sh, const CT *mask,
                                           const FN(bncy_grad_consts) * k, int64_t p0, int64_t p1,
                                           int training, int unit) {
    if (!unit)
        FN(rows_dx_impl)(dy, dys, x, xs, dx, dxs, sh, mask, *k, p0, p1, training, mask != NULL,
                         0);
    else if (!training)
        FN(rows_dx_impl)(dy, dys, x, xs, dx, dxs, sh, NULL, *k, p0, p1, 0, 0, 1);
    else if (mask)
        FN(rows_dx_impl)(dy, dys, x, xs, dx, dxs, sh, mask, *k, p0, p1, 1, 1, 1);
    else
        FN(rows_dx_impl)(dy, dys, x, xs, dx, dxs, sh, NULL, *k, p0, p1, 1, 0, 1);
}

BNCY_INLINE void FN(plane_dx_one)(const T *dp, bncy_strides dys, const T *xp, bncy_strides xs,
                                  T *op, bncy_strides dxs, const CT *wp,
                                  const FN(bncy_grad_consts) * k, int64_t n, int64_t c,
                                  int training, int unit, int stream) {
    const CT *mask = wp;
    /* stream is looked at once per run, outside the vector loop: no specialization for it */
    if (!training)
        FN(plane_dx_impl)(dp, dys.inner, xp, xs.inner, op, dxs.inner, NULL, n, c, *k, 0, 0,
                          stream);
    else if (unit && mask)
        FN(plane_dx_impl)(dp, 1, xp, 1, op, 1, wp, n, c, *k, 1, 1, 0);
    else if (unit)
        FN(plane_dx_impl)(dp, 1, xp, 1, op, 1, NULL, n, c, *k, 1, 0, stream);
    else
        FN(plane_dx_impl)(dp, dys.inner, xp, xs.inner, op, dxs.inner, wp, n, c, *k, 1,
                          mask != NULL, 0);
}

/* unit u as in plane_normalize_unit */
static BNCY_NOINLINE void FN(plane_dx_unit)(const T *dy, bncy_strides dys, const T *x,
                                            bncy_strides xs, T *dx, bncy_strides dxs,
                                            bncy_shape sh, const CT *mask,
                                            const FN(bncy_grad_consts) * k, int64_t u, int64_t nb,
                                            int training, int unit, int stream) {
    int64_t q0, q1, i0, n, q;
    FN(plane_range)(u, nb, sh, &q0, &q1, &i0, &n);
    for (q = q0; q < q1; q++) {
        const int64_t c = q % sh.chan, o = q / sh.chan;
        FN(plane_dx_one)(dy + o * dys.outer + c * dys.chan + i0 * dys.inner, dys,
                         x + o * xs.outer + c * xs.chan + i0 * xs.inner, xs,
                         dx + o * dxs.outer + c * dxs.chan + i0 * dxs.inner, dxs,
                         mask ? mask + o * sh.inner + i0 : NULL, k, n, c, training, unit, stream);
    }
    if (stream) BNCY_STREAM_FENCE();
}

/* Planes [q0, q1) of dy, x and dx with planes_flat (no mask), as one flat run whose vector
   stores all start at aligned addresses, as plane_flat_normalize_unit walks the normalize: the
   vector that straddles two planes takes each lane's constants from its own plane. Every element
   gets dx_value's arithmetic with its plane's constants, so the results are plane_dx_unit's.
   The per-plane walk does not peel planes shorter than BNCY_PEEL_MIN, so from buffers 16 bytes
   past a line (as numpy often allocates them) its vector stores split across lines: on the
   2-core Zen 3 VM, backward of (64, 256, 128) axis=1 with out= took 1.38 - 1.45x as long from
   such buffers as from aligned ones at one thread, and this walk takes 0.83 (one thread) and
   0.78 (two) of its time (medians of ten paired benchmarks/ab.py runs). */
BNCY_INLINE void FN(plane_flat_dx_impl)(const T *dy, const T *x, T *dx, bncy_shape sh,
                                        FN(bncy_grad_consts) k, int64_t u, int64_t nb,
                                        const int training, int stream) {
    const int64_t L = sh.inner, C = sh.chan, V = BNCY_VLANES;
    int64_t q0, q1, i0, len, i, j, q, c, n;
    const T *BNCY_RESTRICT df;
    const T *BNCY_RESTRICT xf;
    T *BNCY_RESTRICT of;
    FN(plane_range)(u, nb, sh, &q0, &q1, &i0, &len);
    df = dy + q0 * L;
    xf = x + q0 * L;
    of = dx + q0 * L;
    n = (q1 - q0) * L;
    i = bncy_peel(of, (int64_t)sizeof(T), n); /* < V <= L: all in the first plane */
    c = q0 % C;
    for (j = 0; j < i; j++)
        STORE(of + j, FN(dx_value)(LOAD(df + j), training ? LOAD(xf + j) : (CT)0, (CT)1, c, k,
                                   training, 0));
    stream = stream && (uintptr_t)(of + i) % BNCY_ALIGN == 0; /* then every vector is aligned */
    for (q = 0; i + V <= n; q++) {
        const int64_t end = (q + 1) * L; /* the end of plane q of the run */
        const int64_t vend = i + (end - i) / V * V;
        const CT A = k.A[c];
        const CT B = training ? k.B[c] : (CT)0, K = training ? k.K[c] : (CT)0;
        const CT iv = training ? k.inv[c] : (CT)0, h = training ? k.hi[c] : (CT)0;
        j = stream ? i + STREAM_DX_PLANE(of + i, df + i, xf + i, A, B, K, iv, h, vend - i,
                                         training)
                   : i;
        if (training) {
            BNCY_IVDEP for (; j < vend; j++)
                STORE(of + j, A * LOAD(df + j) - FN(dx_term)(LOAD(xf + j), B, K, iv, h));
        } else {
            BNCY_IVDEP for (; j < vend; j++) STORE(of + j, A * LOAD(df + j));
        }
        i = vend;
        c = c + 1 == C ? 0 : c + 1; /* the channel of plane q + 1 */
        if (i < end) { /* a vector over the last r elements of plane q and the next plane's */
            const int64_t r = end - i;
            const CT A1 = k.A[c];
            const CT B1 = training ? k.B[c] : (CT)0, K1 = training ? k.K[c] : (CT)0;
            const CT iv1 = training ? k.inv[c] : (CT)0, h1 = training ? k.hi[c] : (CT)0;
            int64_t l;
            if (i + V > n) break; /* no next plane: the last elements, below */
            BNCY_LANE_LOOP for (l = 0; l < V; l++) {
                const int first = l < r;
                const CT g = LOAD(df + i + l), al = first ? A : A1;
                if (training)
                    STORE(of + i + l,
                          al * g - FN(dx_term)(LOAD(xf + i + l), first ? B : B1, first ? K : K1,
                                               first ? iv : iv1, first ? h : h1));
                else
                    STORE(of + i + l, al * g);
            }
            i += V;
        }
    }
    for (; i < n; i++) { /* fewer than V elements at the end of the run */
        c = (q0 + i / L) % C;
        STORE(of + i, FN(dx_value)(LOAD(df + i), training ? LOAD(xf + i) : (CT)0, (CT)1, c, k,
                                   training, 0));
    }
}

static BNCY_NOINLINE void FN(plane_flat_dx_unit)(const T *dy, const T *x, T *dx, bncy_shape sh,
                                                 const FN(bncy_grad_consts) * k, int64_t u,
                                                 int64_t nb, int training, int stream) {
    if (training)
        FN(plane_flat_dx_impl)(dy, x, dx, sh, *k, u, nb, 1, stream);
    else
        FN(plane_flat_dx_impl)(dy, x, dx, sh, *k, u, nb, 0, stream);
    if (stream) BNCY_STREAM_FENCE();
}

BNCY_INLINE FN(bncy_grad_consts) FN(grad_consts_view)(const CT *arr, int64_t C) {
    FN(bncy_grad_consts) k;
    k.A = arr;
    k.B = arr + C;
    k.K = arr + 2 * C;
    k.inv = arr + 3 * C;
    k.hi = arr + 4 * C;
    return k;
}

/* Whether dx can take the flat rows walk (which needs room for the rotated constants). */
BNCY_INLINE int FN(dx_flat)(bncy_shape sh, bncy_strides dys, bncy_strides xs, bncy_strides dxs,
                            const CT *mask) {
    return !mask && bncy_flat_rows(sh, xs) && bncy_flat_rows(sh, dys) &&
           bncy_flat_rows(sh, dxs) && FN(rows_alignable)(sh);
}

/* The walk of the dx pass; flat: FN(dx_flat) holds and the rotated constants have room. Runs of
   short planes without a mask go flat (plane_flat_dx_unit) where dy, x and dx have
   planes_flat. */
static bncy_walk FN(dx_setup)(const T *dx, bncy_shape sh, bncy_strides dys, bncy_strides xs,
                              bncy_strides dxs, const CT *mask, int flat) {
    /* flat rows four at a time, whatever their length, where dy, x and dx fit (walk_setup). On
       the 2-core Zen 3 VM (32 MiB L3), benchmarks/ab.py, backward with out=, float32, one row
       at a time against four, three runs of 30 rounds: (4096, 256) and (5120, 256) (12 and
       15 MiB of arrays) 0.84 - 0.90 at one thread and 0.90 - 1.01 at two; (1024, 256) -
       (2048, 256) 0.95 - 1.03; (256, 1024) 1.01 - 1.03 (kept by fours). */
    return FN(walk_setup)(dx, sh, xs, 2, flat, xs.chan == 1 && dys.chan == 1 && dxs.chan == 1,
                          xs.inner == 1 && dys.inner == 1 && dxs.inner == 1,
                          !mask && FN(planes_flat)(sh, xs, dxs) && FN(planes_flat)(sh, dys, dxs));
}

/* This thread's share of the dx pass, inside a BNCY_TEAM (no barrier after it). k holds the
   constants; kr the same rotated by the walk's k0 (flat walk only). */
static void FN(dx_units)(const bncy_walk * w, const T *dy, bncy_strides dys, const T *x,
                         bncy_strides xs, T *dx, bncy_strides dxs, bncy_shape sh,
                         const CT *mask, const FN(bncy_grad_consts) * k,
                         const FN(bncy_grad_consts) * kr, int training) {
    const int64_t C = sh.chan, M = sh.outer * sh.inner, rows = w->rows;
    if (w->mode == BNCY_WALK_FLAT) { /* aligned (and maybe streamed) vector stores */
        BNCY_TEAM_TAIL_FIRST(w->n_units, {
            const int64_t p0 = u * rows;
            FN(rows_flat_dx_unit)(dy, x, dx, C, w->k0, k, kr, p0, bncy_min64(M, p0 + rows),
                                  training, w->stream, w->four);
        });
    } else if (w->mode == BNCY_WALK_ROWS) {
        BNCY_TEAM_TAIL_FIRST(w->n_units, {
            const int64_t p0 = u * rows;
            FN(rows_dx_unit)(dy, dys, x, xs, dx, dxs, sh, mask, k, p0, bncy_min64(M, p0 + rows),
                             training, w->unit);
        });
    } else if (w->mode == BNCY_WALK_PLANES_FLAT) { /* runs of short planes, no mask */
        int64_t u;
        BNCY_TEAM_FOR(u, w->n_units, {
            FN(plane_flat_dx_unit)(dy, x, dx, sh, k, u, w->nb, training, w->stream);
        });
    } else {
        int64_t u;
        BNCY_TEAM_FOR(u, w->n_units, {
            FN(plane_dx_unit)(dy, dys, x, xs, dx, dxs, sh, mask, k, u, w->nb, training, w->unit,
                              w->stream);
        });
    }
}

/* The dx pass from its constants arr = [A | B | K | inv | hi], in a parallel region of its own. */
static void FN(dx_pass)(const T *dy, bncy_strides dys, const T *x, bncy_strides xs, T *dx,
                        bncy_strides dxs, bncy_shape sh, const CT *mask, const CT *arr,
                        int training, int n_threads) {
    const int64_t C = sh.chan, M = sh.outer * sh.inner;
    const int nt = bncy_threads_for(M * C, n_threads);
    const FN(bncy_grad_consts) k = FN(grad_consts_view)(arr, C);
    /* the rotated constants, aligned as in backward_team; no memory for them: the plain rows
       walk */
    void *raw = FN(dx_flat)(sh, dys, xs, dxs, mask)
                    ? malloc((size_t)(5 * C) * sizeof(CT) + BNCY_ALIGN)
                    : NULL;
    CT *rot = raw ? (CT *)bncy_align_up(raw) : NULL;
    const bncy_walk w = FN(dx_setup)(dx, sh, dys, xs, dxs, mask, rot != NULL);
    FN(bncy_grad_consts) kr = k;
    if (rot) {
        FN(rotate_consts_range)(rot, arr, C, w.k0, 0, C, 5);
        kr = FN(grad_consts_view)(rot, C);
    }
    BNCY_TEAM(nt, { FN(dx_units)(&w, dy, dys, x, xs, dx, dxs, sh, mask, &k, &kr, training); });
    free(raw);
}

/* Sum of the weights over the positions (the same for every channel). */
static double FN(weight_total)(const CT *mask, int64_t M) {
    double a[BNCY_LANES] = {0};
    int64_t p;
    if (!mask) return (double)M;
    for (p = 0; p < M; p++) a[p % BNCY_LANES] += (double)mask[p];
    return FN(lanes_total)(a);
}

/* Pass 1 of the backward: sdy = sum(dy), sdyx = sum(dy * (x - mean)) per channel, over every
   position (masked or not). */
int FN(bncy_grad_sums)(const T *dy, bncy_strides dys, const T *x, bncy_strides xs, bncy_shape sh,
                       const double *mean, double *sdy, double *sdyx, int n_threads) {
    if (sh.outer < 0 || sh.chan < 0 || sh.inner < 0) return BNCY_ERR_ARG;
    if (sh.chan == 0) return BNCY_OK;
    return FN(grad_sums)(dy, dys, x, xs, sh, mean, sdy, sdyx, n_threads);
}

/* The dx constants of channel c into arr = [A | B | K | inv | hi], each of length C. */
BNCY_INLINE void FN(grad_consts_chan)(CT *arr, int64_t C, int64_t c, double mean, double sd,
                                      const double *gamma, int training, double rw, double sdy,
                                      double sdyx) {
    const double inv = 1.0 / sd; /* sd = sqrt(var + eps), shared with dgamma */
    const double g = gamma ? gamma[c] : 1.0;
    const CT hi = (CT)mean;
    const double lo = mean - (double)hi;
    /* dx = A dy - B - xhat K with xhat = (x - mean) inv and K = g inv (inv sdyx) / W, rw = 1/W
       (a product, not a division per channel: the divisions dominate at many channels);
       inv * (inv * sdyx): no underflow of inv^2 for huge variances */
    const double kk = training ? g * inv * (inv * sdyx) * rw : 0.0;
    const double bb = training ? g * inv * sdy * rw : 0.0;
    arr[c] = (CT)(g * inv);
    /* (x - mean) inv K = (x - hi) inv K - lo inv K: the lo part is folded into B in double */
    arr[C + c] = (CT)(bb - (lo != 0.0 ? lo * inv * kk : 0.0));
    arr[2 * C + c] = (CT)kk;
    arr[3 * C + c] = (CT)inv;
    arr[4 * C + c] = hi;
}

/* Pass 2 of the backward: dx from the sums of pass 1 and the total weight W (training), or
   dx = dy * gamma / sqrt(var + eps) (inference; the sums and W are not used). */
int FN(bncy_grad_input)(const T *dy, bncy_strides dys, const T *x, bncy_strides xs, T *dx,
                        bncy_strides dxs, bncy_shape sh, const CT *mask, const double *mean,
                        const double *var, const double *gamma, double eps, int training,
                        double wtotal, const double *sdy, const double *sdyx, int n_threads) {
    const int64_t C = sh.chan, M = sh.outer * sh.inner;
    CT *arr;
    int64_t c;
    if (sh.outer < 0 || sh.chan < 0 || sh.inner < 0) return BNCY_ERR_ARG;
    if (C == 0 || M == 0) return BNCY_OK;
    arr = (CT *)malloc((size_t)(5 * C) * sizeof(CT)); /* the dx constants */
    if (!arr) return BNCY_ERR_NOMEM;
    for (c = 0; c < C; c++)
        FN(grad_consts_chan)(arr, C, c, mean[c], sqrt(var[c] + eps), gamma, training,
                             1.0 / wtotal, sdy[c], sdyx[c]);
    FN(dx_pass)(dy, dys, x, xs, dx, dxs, sh, mask, arr, training, n_threads);
    free(arr);
    return BNCY_OK;
}

/* Fused backward for planes (see fused_cblock): one block of channels at a time, the sums of
   pass 1 and then dx, so the second read of the block's x and dy comes from the cache. A
   channel's sums are those of grad_sums: the same groups of positions, each summed by the same
   function and added in group order; the constants and the elementwise dx are those of
   bncy_grad_input. So the results are bitwise those of the two passes. */
static BNCY_NOINLINE void FN(backward_fused_unit)(const T *dy, bncy_strides dys, const T *x,
                                                  bncy_strides xs, T *dx, bncy_strides dxs,
                                                  bncy_shape sh, const CT *mask,
                                                  const double *mean, const double *var,
                                                  const double *gamma, double eps, int training,
                                                  double wtotal, const bncy_plan *plan, CT *arr,
                                                  int64_t c0, int64_t nc, double *dgamma,
                                                  double *dbeta, int stream) {
    const int64_t C = sh.chan, G = plan->n_groups;
    const int unit = xs.inner == 1 && dys.inner == 1 && dxs.inner == 1;
    const FN(bncy_grad_consts) k = FN(grad_consts_view)(arr, C);
    double sdy[BNCY_FUSED_CBLOCK_MAX], sdyx[BNCY_FUSED_CBLOCK_MAX];
    int64_t g, c, o;
    for (c = 0; c < nc; c++) sdy[c] = sdyx[c] = 0.0;
    for (g = 0; g < G; g++) {
        const int64_t p0 = g * plan->group_len, p1 = bncy_min64(plan->M, p0 + plan->group_len);
        for (c = 0; c < nc; c++) {
            double a, b;
            FN(plane_grad_sums)(dy, dys, x, xs, sh, mean[c0 + c], p0, p1, c0 + c, &a, &b);
            sdy[c] += a;
            sdyx[c] += b;
        }
    }
    for (c = 0; c < nc; c++) {
        dbeta[c0 + c] = sdy[c];
        const double sd = sqrt(var[c0 + c] + eps);
        dgamma[c0 + c] = bncy_dgamma(sdyx[c], sd);
        FN(grad_consts_chan)(arr, C, c0 + c, mean[c0 + c], sd, gamma, training, 1.0 / wtotal,
                             sdy[c], sdyx[c]);
    }
    for (o = 0; o < sh.outer; o++) {
        for (c = c0; c < c0 + nc; c++)
            FN(plane_dx_one)(dy + o * dys.outer + c * dys.chan, dys, x + o * xs.outer + c * xs.chan,
                             xs, dx + o * dxs.outer + c * dxs.chan, dxs,
                             mask ? mask + o * sh.inner : NULL, &k, sh.inner, c, training, unit,
                             stream);
    }
    if (stream) BNCY_STREAM_FENCE();
}

static int FN(backward_fused)(const T *dy, bncy_strides dys, const T *x, bncy_strides xs, T *dx,
                             bncy_strides dxs, bncy_shape sh, const CT *mask, const double *mean,
                             const double *var, const double *gamma, double eps, int training,
                             double *dgamma, double *dbeta, int64_t cb, int n_threads) {
    const int64_t C = sh.chan, M = sh.outer * sh.inner, n_units = bncy_cdiv(C, cb);
    const bncy_plan plan = bncy_make_plan(sh, xs);
    const double wtotal = training ? FN(weight_total)(mask, M) : 0.0;
    const int nt = bncy_threads_for(M * C, n_threads), stream = FN(streams)(sh, 2);
    CT *arr = (CT *)malloc((size_t)(5 * C) * sizeof(CT));
    int64_t u;
    if (!arr) return BNCY_ERR_NOMEM;
    BNCY_PARALLEL_FOR(nt, u, n_units, {
        const int64_t c0 = u * cb;
        FN(backward_fused_unit)(dy, dys, x, xs, dx, dxs, sh, mask, mean, var, gamma, eps,
                                training, wtotal, &plan, arr, c0, bncy_min64(cb, C - c0), dgamma,
                                dbeta, stream);
    });
    free(arr);
    return BNCY_OK;
}

/* Channels [c0, c1) of the separate-pass backward's per-channel work: the sums (dbeta, sdyx)
   from the group partials, sd = sqrt(var + eps) shared by dgamma and the dx constants, the
   constants arr and their rotated copy rot (flat walk; NULL otherwise). The formulas are those
   of bncy_grad_sums and bncy_grad_input, so the results are bitwise theirs. */
static void FN(backward_chan_range)(const double *part, int64_t G, int64_t C, int64_t c0,
                                    int64_t c1, const double *mean, const double *var,
                                    const double *gamma, double eps, int training, double rw,
                                    double *dgamma, double *dbeta, double *sdyx, double *sd,
                                    CT *arr, CT *rot, int64_t k0) {
    int64_t c;
    FN(grad_sums_merge)(part, G, C, c0, c1, dbeta, sdyx);
    BNCY_IVDEP for (c = c0; c < c1; c++) {
        sd[c] = sqrt(var[c] + eps);
        dgamma[c] = bncy_dgamma(sdyx[c], sd[c]);
    }
    for (c = c0; c < c1; c++)
        FN(grad_consts_chan)(arr, C, c, mean[c], sd[c], gamma, training, rw, dbeta[c], sdyx[c]);
    if (rot) FN(rotate_consts_range)(rot, arr, C, k0, c0, c1, 5);
}

/* The backward in separate passes, all in one parallel region: the sums' group partials
   (grad_sums_unit, split as in grad_sums), then each channel's sums, dgamma and dx constants
   (split by channels: the per-channel work at many channels is a few microseconds, and each
   channel's arithmetic is the same whichever thread does it), then dx (the walk of dx_pass,
   split as there). Two barriers instead of two regions and the serial work between them. */
static int FN(backward_team)(const T *dy, bncy_strides dys, const T *x, bncy_strides xs, T *dx,
                             bncy_strides dxs, bncy_shape sh, const CT *mask, const double *mean,
                             const double *var, const double *gamma, double eps, int training,
                             double *dgamma, double *dbeta, int n_threads) {
    const int64_t C = sh.chan, M = sh.outer * sh.inner;
    const bncy_plan plan = bncy_make_plan(sh, xs);
    const int64_t G = plan.n_groups, n_chunks = bncy_cdiv(C, BNCY_CONSTS_CHUNK);
    const int flat = FN(dx_flat)(sh, dys, xs, dxs, mask);
    const int nt = bncy_threads_for(M * C, n_threads);
    const double rw = training ? 1.0 / FN(weight_total)(mask, M) : 0.0;
    /* the partials, sdyx, sd (doubles), then the constants and their rotated copy, each
       aligned */
    double *part = (double *)malloc((size_t)((2 * G + 2) * C) * sizeof(double) +
                                    (size_t)((flat ? 10 : 5) * C) * sizeof(CT) + 2 * BNCY_ALIGN);
    double *sdyx, *sd;
    CT *arr, *rot;
    bncy_walk w;
    FN(bncy_grad_consts) k, kr;
    if (!part) return BNCY_ERR_NOMEM;
    sdyx = part + 2 * G * C;
    sd = sdyx + C;
    arr = (CT *)bncy_align_up(sd + C);
    rot = flat ? (CT *)bncy_align_up(arr + 5 * C) : NULL;
    w = FN(dx_setup)(dx, sh, dys, xs, dxs, mask, flat);
    k = FN(grad_consts_view)(arr, C);
    kr = flat ? FN(grad_consts_view)(rot, C) : k;
    BNCY_TEAM(nt, {
        int64_t u;
        BNCY_TEAM_FOR(u, plan.n_units,
                      { FN(grad_sums_unit)(dy, dys, x, xs, sh, mean, &plan, part, u); });
        BNCY_TEAM_FOR(u, n_chunks, {
            const int64_t c0 = u * BNCY_CONSTS_CHUNK;
            FN(backward_chan_range)(part, G, C, c0, bncy_min64(C, c0 + BNCY_CONSTS_CHUNK), mean,
                                    var, gamma, eps, training, rw, dgamma, dbeta, sdyx, sd, arr,
                                    rot, w.k0);
        });
        FN(dx_units)(&w, dy, dys, x, xs, dx, dxs, sh, mask, &k, &kr, training);
    });
    free(part);
    return BNCY_OK;
}

int FN(bncy_batch_norm_backward)(const T *dy, bncy_strides dys, const T *x, bncy_strides xs,
                                 T *dx, bncy_strides dxs, bncy_shape sh, const CT *mask,
                                 const double *mean, const double *var, const double *gamma,
                                 double eps, int training, double *dgamma, double *dbeta,
                                 int n_threads) {
    const int64_t C = sh.chan, M = sh.outer * sh.inner;
    int64_t c;
    if (sh.outer < 0 || sh.chan < 0 || sh.inner < 0) return BNCY_ERR_ARG;
    if (C == 0) return BNCY_OK;
    if (M > 0) {
        const int64_t cb = FN(fused_cblock)(sh, xs, 2, n_threads);
        if (cb > 0)
            return FN(backward_fused)(dy, dys, x, xs, dx, dxs, sh, mask, mean, var, gamma, eps,
                                      training, dgamma, dbeta, cb, n_threads);
    }
    if (M == 0) { /* an empty sum is 0, even with NaN statistics */
        for (c = 0; c < C; c++) dgamma[c] = dbeta[c] = 0.0;
        return BNCY_OK;
    }
    return FN(backward_team)(dy, dys, x, xs, dx, dxs, sh, mask, mean, var, gamma, eps, training,
                             dgamma, dbeta, n_threads);
}

#undef FN
#undef BNCY_CAT3
#undef BNCY_CAT3_
#undef BNCY_T_STREAMS
#ifndef STREAMS
#undef STREAM_ROWS
#undef STREAM_PLANE
#undef STREAM_DX_ROWS
#undef STREAM_DX_PLANE
#endif
