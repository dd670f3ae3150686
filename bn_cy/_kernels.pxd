# Declarations of the C API in src_c/bn_cy.h, taken from the header itself (cdef extern).
from libc.stdint cimport int64_t, uint16_t

cdef extern from "../src_c/bn_cy.h" nogil:
    int BNCY_OK
    int BNCY_ERR_NOMEM
    int BNCY_ERR_ARG

    ctypedef struct bncy_shape:
        int64_t outer
        int64_t chan
        int64_t inner

    ctypedef struct bncy_strides:
        int64_t outer
        int64_t chan
        int64_t inner

    ctypedef uint16_t bncy_half
    ctypedef uint16_t bncy_bfloat16

    int bncy_moments_f32(const float *x, bncy_strides xs, bncy_shape sh, const float *mask,
                         double *mean, double *var, int n_threads)
    int bncy_moments_f64(const double *x, bncy_strides xs, bncy_shape sh, const double *mask,
                         double *mean, double *var, int n_threads)
    int bncy_moments_f16(const bncy_half *x, bncy_strides xs, bncy_shape sh, const float *mask,
                         double *mean, double *var, int n_threads)
    int bncy_moments_bf16(const bncy_bfloat16 *x, bncy_strides xs, bncy_shape sh,
                          const float *mask, double *mean, double *var, int n_threads)

    int bncy_batch_norm_f32(const float *x, bncy_strides xs, float *y, bncy_strides ys,
                            bncy_shape sh, const double *mean, const double *var,
                            const double *gamma, const double *beta, double eps, int n_threads)
    int bncy_batch_norm_f64(const double *x, bncy_strides xs, double *y, bncy_strides ys,
                            bncy_shape sh, const double *mean, const double *var,
                            const double *gamma, const double *beta, double eps, int n_threads)
    int bncy_batch_norm_f16(const bncy_half *x, bncy_strides xs, bncy_half *y, bncy_strides ys,
                            bncy_shape sh, const double *mean, const double *var,
                            const double *gamma, const double *beta, double eps, int n_threads)
    int bncy_batch_norm_bf16(const bncy_bfloat16 *x, bncy_strides xs, bncy_bfloat16 *y,
                             bncy_strides ys, bncy_shape sh, const double *mean,
                             const double *var, const double *gamma, const double *beta,
                             double eps, int n_threads)

    int bncy_batch_norm_train_f32(const float *x, bncy_strides xs, float *y, bncy_strides ys,
                                  bncy_shape sh, const float *mask, const double *gamma,
                                  const double *beta, double eps, double *mean, double *var,
                                  int n_threads)
    int bncy_batch_norm_train_f64(const double *x, bncy_strides xs, double *y, bncy_strides ys,
                                  bncy_shape sh, const double *mask, const double *gamma,
                                  const double *beta, double eps, double *mean, double *var,
                                  int n_threads)
    int bncy_batch_norm_train_f16(const bncy_half *x, bncy_strides xs, bncy_half *y,
                                  bncy_strides ys, bncy_shape sh, const float *mask,
                                  const double *gamma, const double *beta, double eps,
                                  double *mean, double *var, int n_threads)
    int bncy_batch_norm_train_bf16(const bncy_bfloat16 *x, bncy_strides xs, bncy_bfloat16 *y,
                                   bncy_strides ys, bncy_shape sh, const float *mask,
                                   const double *gamma, const double *beta, double eps,
                                   double *mean, double *var, int n_threads)

    int bncy_batch_norm_backward_f32(const float *dy, bncy_strides dys, const float *x,
                                     bncy_strides xs, float *dx, bncy_strides dxs, bncy_shape sh,
                                     const float *mask, const double *mean, const double *var,
                                     const double *gamma, double eps, int training,
                                     double *dgamma, double *dbeta, int n_threads)
    int bncy_batch_norm_backward_f64(const double *dy, bncy_strides dys, const double *x,
                                     bncy_strides xs, double *dx, bncy_strides dxs,
                                     bncy_shape sh, const double *mask, const double *mean,
                                     const double *var, const double *gamma, double eps,
                                     int training, double *dgamma, double *dbeta, int n_threads)
    int bncy_batch_norm_backward_f16(const bncy_half *dy, bncy_strides dys, const bncy_half *x,
                                     bncy_strides xs, bncy_half *dx, bncy_strides dxs,
                                     bncy_shape sh, const float *mask, const double *mean,
                                     const double *var, const double *gamma, double eps,
                                     int training, double *dgamma, double *dbeta, int n_threads)
    int bncy_batch_norm_backward_bf16(const bncy_bfloat16 *dy, bncy_strides dys,
                                      const bncy_bfloat16 *x, bncy_strides xs,
                                      bncy_bfloat16 *dx, bncy_strides dxs, bncy_shape sh,
                                      const float *mask, const double *mean, const double *var,
                                      const double *gamma, double eps, int training,
                                      double *dgamma, double *dbeta, int n_threads)

    int bncy_moments_partial_f32(const float *x, bncy_strides xs, bncy_shape sh, const float *mask,
                                 double *wsum, double *mean, double *m2sum, int n_threads)
    int bncy_grad_sums_f32(const float *dy, bncy_strides dys, const float *x, bncy_strides xs,
                           bncy_shape sh, const double *mean, double *sdy, double *sdyx,
                           int n_threads)
    int bncy_grad_input_f32(const float *dy, bncy_strides dys, const float *x, bncy_strides xs,
                            float *dx, bncy_strides dxs, bncy_shape sh, const float *mask,
                            const double *mean, const double *var, const double *gamma,
                            double eps, int training, double wtotal, const double *sdy,
                            const double *sdyx, int n_threads)

    int bncy_moments_partial_f64(const double *x, bncy_strides xs, bncy_shape sh, const double *mask,
                                 double *wsum, double *mean, double *m2sum, int n_threads)
    int bncy_grad_sums_f64(const double *dy, bncy_strides dys, const double *x, bncy_strides xs,
                           bncy_shape sh, const double *mean, double *sdy, double *sdyx,
                           int n_threads)
    int bncy_grad_input_f64(const double *dy, bncy_strides dys, const double *x, bncy_strides xs,
                            double *dx, bncy_strides dxs, bncy_shape sh, const double *mask,
                            const double *mean, const double *var, const double *gamma,
                            double eps, int training, double wtotal, const double *sdy,
                            const double *sdyx, int n_threads)

    int bncy_moments_partial_f16(const bncy_half *x, bncy_strides xs, bncy_shape sh, const float *mask,
                                 double *wsum, double *mean, double *m2sum, int n_threads)
    int bncy_grad_sums_f16(const bncy_half *dy, bncy_strides dys, const bncy_half *x, bncy_strides xs,
                           bncy_shape sh, const double *mean, double *sdy, double *sdyx,
                           int n_threads)
    int bncy_grad_input_f16(const bncy_half *dy, bncy_strides dys, const bncy_half *x, bncy_strides xs,
                            bncy_half *dx, bncy_strides dxs, bncy_shape sh, const float *mask,
                            const double *mean, const double *var, const double *gamma,
                            double eps, int training, double wtotal, const double *sdy,
                            const double *sdyx, int n_threads)

    int bncy_moments_partial_bf16(const bncy_bfloat16 *x, bncy_strides xs, bncy_shape sh, const float *mask,
                                 double *wsum, double *mean, double *m2sum, int n_threads)
    int bncy_grad_sums_bf16(const bncy_bfloat16 *dy, bncy_strides dys, const bncy_bfloat16 *x, bncy_strides xs,
                           bncy_shape sh, const double *mean, double *sdy, double *sdyx,
                           int n_threads)
    int bncy_grad_input_bf16(const bncy_bfloat16 *dy, bncy_strides dys, const bncy_bfloat16 *x, bncy_strides xs,
                            bncy_bfloat16 *dx, bncy_strides dxs, bncy_shape sh, const float *mask,
                            const double *mean, const double *var, const double *gamma,
                            double eps, int training, double wtotal, const double *sdy,
                            const double *sdyx, int n_threads)

    int bncy_moments_in_team_f64(const double *x, bncy_strides xs, bncy_shape sh, double *mean,
                                 double *var, int team, int n_threads)
    int bncy_openmp_enabled()
    int bncy_omp_max_threads()
    int bncy_num_procs()
    const char *bncy_simd_level()
    const char *bncy_simd_compiled()
    double bncy_llc_bytes()
    double bncy_stream_min_bytes()
    const char *bncy_compiler()
    void bncy_ema_f32(float *moving, const float *batch, int64_t n, float momentum, float rest)
    void bncy_ema_f64(double *moving, const double *batch, int64_t n, double momentum,
                      double rest)
