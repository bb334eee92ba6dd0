/* knockout's statistics update compiled for the CPU: the moments and eps-histogram of one batch, for a range of
 * neurons (knockout/stats/native.py builds it with the system C compiler; without one, knockout uses its torch path).
 *
 * The same arithmetic as LayerStats.add's torch path: bin = floorf(x / eps) in float32 (IEEE division and floor; built
 * without fast-math and without contracting into FMA, so the bins are those of the torch path bit for bit), batch
 * moments in double in two passes (the mean, then the squared deviations from it; summed in another order than torch,
 * so equal to float64 rounding).
 *
 * Two calls per batch: ko_pass1 (mean, extremes, NaN/inf), then, once the caller has checked the batch and grown
 * the histogram to its bins, ko_pass2 (squared deviations, counts). x: [n, w] float32, row-major. Only neurons
 * j0 <= j < j1 are touched, so calls on disjoint ranges may run at once. Neurons are done BLOCK at a time (their
 * accumulators and histogram rows stay in cache while their columns are read); per row, the arithmetic runs in
 * vectorisable loops and the counts one by one.
 */
#include <math.h>
#include <stdint.h>

#define BLOCK 64

/* mean (double, written to mean), minimum and maximum (float, to lo and hi) of each neuron; returns the number of
 * NaN/inf values (a NaN is never taken as a minimum or maximum: the caller must refuse the batch). */
int64_t ko_pass1(const float *x, int64_t n, int64_t w, int64_t j0, int64_t j1, double *mean, float *lo, float *hi) {
    int64_t bad = 0;
    for (int64_t b0 = j0; b0 < j1; b0 += BLOCK) {
        const int64_t m = (b0 + BLOCK < j1 ? b0 + BLOCK : j1) - b0;
        double s[BLOCK] = {0};
        float mn[BLOCK], mx[BLOCK];
        int32_t nonfinite[BLOCK] = {0};
        for (int64_t j = 0; j < m; j++) mn[j] = mx[j] = x[b0 + j];
        for (int64_t i = 0; i < n; i++) {
            const float *row = x + i * w + b0;
            for (int64_t j = 0; j < m; j++) s[j] += (double)row[j];
            for (int64_t j = 0; j < m; j++) {
                const float v = row[j];
                mn[j] = v < mn[j] ? v : mn[j];
                mx[j] = v > mx[j] ? v : mx[j];
                nonfinite[j] += (v - v) != 0.0f; /* v - v is NaN exactly when v is NaN or inf */
            }
        }
        for (int64_t j = 0; j < m; j++) {
            mean[b0 + j] = s[j] / (double)n;
            lo[b0 + j] = mn[j];
            hi[b0 + j] = mx[j];
            bad += nonfinite[j];
        }
    }
    return bad;
}

/* The sum of squared deviations from mean (double, written to m2) and the counts of finite x. hist: [w, n_bins]
 * int64, column c holding bin k_lo + c; every bin of the batch inside [k_min, k_max] must lie in [k_lo, k_lo + n_bins)
 * (the caller grows hist first); bins below k_min / above k_max count in under / over. */
void ko_pass2(const float *x, int64_t n, int64_t w, int64_t j0, int64_t j1, float eps, int64_t k_min, int64_t k_max,
              int64_t k_lo, int64_t n_bins, const double *mean, int64_t *hist, int64_t *under, int64_t *over,
              double *m2) {
    const float lo = (float)k_min, hi = (float)k_max;
    for (int64_t b0 = j0; b0 < j1; b0 += BLOCK) {
        const int64_t m = (b0 + BLOCK < j1 ? b0 + BLOCK : j1) - b0;
        double q[BLOCK] = {0};
        float kf[BLOCK];
        int32_t ki[BLOCK];
        const float base = (float)k_lo; /* whole numbers below 2^24 (check_hist_params): exact in float */
        for (int64_t i = 0; i < n; i++) {
            const float *row = x + i * w + b0;
            for (int64_t j = 0; j < m; j++) {
                const double d = (double)row[j] - mean[b0 + j];
                q[j] += d * d;
            }
            for (int64_t j = 0; j < m; j++) { /* the bin, clamped to one below / above the window */
                const float k = floorf(row[j] / eps);
                kf[j] = k < lo ? lo - 1.0f : (k > hi ? hi + 1.0f : k);
            }
            /* column of the bin: < 0 below the window, >= n_bins above it (the stored bins lie inside it) */
            for (int64_t j = 0; j < m; j++) ki[j] = (int32_t)(kf[j] - base);
            for (int64_t j = 0; j < m; j++) {
                const int32_t c = ki[j];
                if ((uint32_t)c < (uint32_t)n_bins) {
                    hist[(b0 + j) * n_bins + c]++;
                } else if (c < 0) {
                    under[b0 + j]++;
                } else {
                    over[b0 + j]++;
                }
            }
        }
        for (int64_t j = 0; j < m; j++) m2[b0 + j] = q[j];
    }
}
