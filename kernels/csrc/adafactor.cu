// Adafactor (kernels/adafactor.py; HF transformers semantics). Factored tensors (ndim >= 2)
// in the factored view (B = leading dims, R x C = the last two); others in the flat view.
//   b2t = 1 - t^decay_rate;  g2 = g*g + eps1
//   R <- b2t*R + (1-b2t)*mean_cols(g2);  C <- b2t*C + (1-b2t)*mean_rows(g2)
//   row_factor = 1/sqrt(R/mean(R));  col_factor = 1/sqrt(C);  U = (row_factor*col_factor)*g
//   unfactored: v <- b2t*v + (1-b2t)*g2;  U = g/sqrt(v)
//   alpha = max(eps2, RMS(theta_{t-1}))*rho (or rho);  clip = max(1, RMS(U)/d)
//   u = U/clip*alpha;  beta1: m <- b1*m + (1-b1)*u, u = m
//   theta <- theta - (wd*alpha)*theta;  theta <- theta - u
#include "common.cuh"

// Per tensor, formed in float64 on the host.
struct AdafactorCoef {
    double active;
    double eps1, b2t, c2t;       // eps1, b2t, 1 - b2t
    double rho, scale_on, eps2;  // alpha = (scale_on ? max(eps2, RMS(theta)) : 1) * rho
    double clip_threshold;
    double b1_on, b1, c1;        // momentum on the update (beta1), 1 - b1
    double wd, wd_on;
};

// Per tile: sum theta^2 (for RMS(theta_{t-1})) and sum U^2 (for the clip).
struct TileNorms { double theta_sq, update_sq; };

// Per tensor, decided on the device.
struct AdafactorScale { double clip, alpha, wda; };

// Pass 1, adafactor_sums: norms[k].theta_sq, and for unfactored tensors the v update and
// norms[k].update_sq; factored: g2 partial sums per (row, column strip) and per (column,
// row band).
extern "C" __global__ void __launch_bounds__(BLOCK)
adafactor_sums(const TileRec* __restrict__ tiles, const TensorRec* __restrict__ tinfo,
               const AdafactorCoef* __restrict__ coef, const float* __restrict__ param,
               const void* __restrict__ grad, i64 gkind, float* __restrict__ exp_avg_sq,
               double* __restrict__ row_part, double* __restrict__ col_part,
               TileNorms* __restrict__ norms) {
    __shared__ double cols[WARPS][TC];
    const Tile T = load_tile(tiles, tinfo, blockIdx.x);
    const AdafactorCoef& cf = coef[T.t];
    double s[4] = {0.0, 0.0, 0.0, 0.0};
    if (cf.active != 0.0) {                             // uniform over the block
        const TensorRec& ti = tinfo[T.t];
        const bool factored = ti.rslot >= 0;
        const float eps1 = (float)cf.eps1, b2t = (float)cf.b2t, c2t = (float)cf.c2t;
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
        double colsum[CPL];
#pragma unroll
        for (int q = 0; q < CPL; ++q) colsum[q] = 0.0;
        for (i64 i = warp; i < T.nr; i += WARPS) {
            const i64 rp = tile_row_pos(T, i);
            float p[CPL], g[CPL];
            bool ok[CPL];
#pragma unroll
            for (int q = 0; q < CPL; ++q) {
                const i64 j = lane + 32 * q, pos = rp + j;
                ok[q] = j < T.nc && pos < T.n;
                p[q] = g[q] = 0.0f;
                if (ok[q]) {
                    p[q] = param[T.p + pos];
                    g[q] = load_grad(grad, gkind, T.p + pos);
                }
            }
            double rowsum = 0.0;
#pragma unroll
            for (int q = 0; q < CPL; ++q) {
                if (!ok[q]) continue;
                s[0] += (double)p[q] * (double)p[q];
                const float g2 = g[q] * g[q] + eps1;
                if (factored) {
                    rowsum += (double)g2;
                    colsum[q] += (double)g2;
                } else {
                    const i64 vi = ti.v + rp + lane + 32 * q;
                    float v = exp_avg_sq[vi] * b2t;
                    v = v + c2t * g2;
                    exp_avg_sq[vi] = v;
                    const double u = (double)(g[q] / sqrtf(v));
                    s[1] += u * u;
                }
            }
            if (factored) {
                rowsum = warp_sum(rowsum);
                if (lane == 0)
                    row_part[ti.rslot + tile_row(T, i) * ti.kc + T.c0 / TC] = rowsum;
            }
        }
        if (factored) {
#pragma unroll
            for (int q = 0; q < CPL; ++q) cols[warp][lane + 32 * q] = colsum[q];
            __syncthreads();
            if (threadIdx.x < T.nc) {
                double c = 0.0;
                for (int w = 0; w < WARPS; ++w) c += cols[w][threadIdx.x];
                const i64 col = T.b * T.C + T.c0 + threadIdx.x;
                col_part[ti.cslot + col * ti.kr + T.r0 / TR] = c;
            }
            __syncthreads();
        }
    }
    block_sum4(s);
    if (threadIdx.x == 0) norms[T.k] = TileNorms{s[0], s[1]};
}

// Pass 2, adafactor_combine, one thread per row entry and per column entry of every
// factored tensor (entries indexed as in exp_avg_sq_row / _col):
//   R <- b2t*R + (1-b2t)*float32(row_sum/C);  C <- b2t*C + (1-b2t)*float32(col_sum/R)
//   col_factor = 1/sqrt(C)
extern "C" __global__ void __launch_bounds__(BLOCK)
adafactor_combine(const TensorRec* __restrict__ tinfo, const AdafactorCoef* __restrict__ coef,
                  const i64* __restrict__ row_owner, i64 n_rows,
                  const i64* __restrict__ col_owner, i64 n_cols,
                  const double* __restrict__ row_part, const double* __restrict__ col_part,
                  float* __restrict__ exp_avg_sq_row, float* __restrict__ exp_avg_sq_col,
                  float* __restrict__ col_factor) {
    const i64 e = (i64)blockIdx.x * BLOCK + threadIdx.x;
    if (e < n_rows) {
        const i64 t = row_owner[e];
        const AdafactorCoef& cf = coef[t];
        if (cf.active == 0.0) return;
        const TensorRec& ti = tinfo[t];
        const double* part = row_part + ti.rslot + (e - ti.row) * ti.kc;
        double sum = 0.0;
        for (i64 k = 0; k < ti.kc; ++k) sum += part[k];
        const float b2t = (float)cf.b2t, c2t = (float)cf.c2t;
        exp_avg_sq_row[e] = exp_avg_sq_row[e] * b2t + c2t * (float)(sum / (double)ti.C);
    } else if (e < n_rows + n_cols) {
        const i64 ec = e - n_rows, t = col_owner[ec];
        const AdafactorCoef& cf = coef[t];
        if (cf.active == 0.0) return;
        const TensorRec& ti = tinfo[t];
        const double* part = col_part + ti.cslot + (ec - ti.col) * ti.kr;
        double sum = 0.0;
        for (i64 k = 0; k < ti.kr; ++k) sum += part[k];
        const float b2t = (float)cf.b2t, c2t = (float)cf.c2t;
        const float c = exp_avg_sq_col[ec] * b2t + c2t * (float)(sum / (double)ti.R);
        exp_avg_sq_col[ec] = c;
        col_factor[ec] = 1.0f / sqrtf(c);
    }
}

// Pass 3, adafactor_row_factors, one warp per (tensor, batch):
//   row_factor = 1/sqrt(R/float32(mean(R)))
extern "C" __global__ void __launch_bounds__(BLOCK)
adafactor_row_factors(const i64* __restrict__ batches, i64 n_batches,
                      const TensorRec* __restrict__ tinfo, const AdafactorCoef* __restrict__ coef,
                      const float* __restrict__ exp_avg_sq_row, float* __restrict__ row_factor) {
    const i64 w = (i64)blockIdx.x * WARPS + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (w >= n_batches) return;                         // uniform over the warp
    const i64 t = batches[w * 2], b = batches[w * 2 + 1];
    if (coef[t].active == 0.0) return;
    const TensorRec& ti = tinfo[t];
    const i64 e0 = ti.row + b * ti.R;
    double sum = 0.0;
    for (i64 r = lane; r < ti.R; r += 32) sum += (double)exp_avg_sq_row[e0 + r];
    const float mean = (float)(warp_sum(sum) / (double)ti.R);
    for (i64 r = lane; r < ti.R; r += 32) row_factor[e0 + r] = 1.0f / sqrtf(exp_avg_sq_row[e0 + r] / mean);
}

// Pass 4, adafactor_update_sq (factored tensors): norms[k].update_sq = sum U^2 over the tile.
extern "C" __global__ void __launch_bounds__(BLOCK)
adafactor_update_sq(const TileRec* __restrict__ tiles, const TensorRec* __restrict__ tinfo,
                    const AdafactorCoef* __restrict__ coef, const void* __restrict__ grad, i64 gkind,
                    const float* __restrict__ row_factor, const float* __restrict__ col_factor,
                    TileNorms* __restrict__ norms) {
    const Tile T = load_tile(tiles, tinfo, blockIdx.x);
    const TensorRec& ti = tinfo[T.t];
    if (coef[T.t].active == 0.0 || ti.rslot < 0) return;   // uniform
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const i64 c0 = ti.col + T.b * T.C + T.c0;
    double s[4] = {0.0, 0.0, 0.0, 0.0};
    for (i64 i = warp; i < T.nr; i += WARPS) {
        const i64 rp = tile_row_pos(T, i);
        const float rf = row_factor[ti.row + tile_row(T, i)];
#pragma unroll
        for (int q = 0; q < CPL; ++q) {
            const i64 j = lane + 32 * q;
            if (j < T.nc) {
                const double u = (double)(rf * col_factor[c0 + j] * load_grad(grad, gkind, T.p + rp + j));
                s[0] += u * u;
            }
        }
    }
    block_sum4(s);
    if (threadIdx.x == 0) norms[T.k].update_sq = s[0];
}

// Pass 5, adafactor_decide, one block per tensor: from its tiles' norms,
//   alpha = (scale_parameter ? max(eps2, sqrt(sum theta^2/n)) : 1) * rho
//   clip = max(1, sqrt(sum U^2/n)/clip_threshold);  scale[t] = (clip, alpha, wd*alpha).
extern "C" __global__ void __launch_bounds__(BLOCK)
adafactor_decide(const TensorRec* __restrict__ tinfo, const AdafactorCoef* __restrict__ coef,
                 const TileNorms* __restrict__ norms, AdafactorScale* __restrict__ scale) {
    const i64 t = blockIdx.x;
    const TensorRec& ti = tinfo[t];
    const AdafactorCoef& cf = coef[t];
    double s[4] = {0.0, 0.0, 0.0, 0.0};
    for (i64 i = threadIdx.x; i < ti.ntiles; i += BLOCK) {
        s[0] += norms[ti.tile0 + i].theta_sq;
        s[1] += norms[ti.tile0 + i].update_sq;
    }
    block_sum4(s);
    if (threadIdx.x == 0) {
        if (cf.active == 0.0) {
            scale[t] = AdafactorScale{1.0, 0.0, 0.0};
        } else {
            const double n = (double)ti.n;
            const double rms_scale = cf.scale_on != 0.0 ? fmax(cf.eps2, sqrt(s[0] / n)) : 1.0;
            const double alpha = rms_scale * cf.rho;
            scale[t] = AdafactorScale{fmax(1.0, sqrt(s[1] / n) / cf.clip_threshold), alpha,
                                      cf.wd * alpha};
        }
    }
}

// Pass 6, adafactor_apply: u = U/clip*alpha;  beta1: m <- b1*m + (1-b1)*u, u = m;
//   theta <- theta - (wd*alpha)*theta (if wd != 0);  theta <- theta - u.
extern "C" __global__ void __launch_bounds__(BLOCK)
adafactor_apply(const TileRec* __restrict__ tiles, const TensorRec* __restrict__ tinfo,
                const AdafactorCoef* __restrict__ coef, const AdafactorScale* __restrict__ scale,
                float* __restrict__ param, const void* __restrict__ grad, i64 gkind,
                float* __restrict__ exp_avg, const float* __restrict__ exp_avg_sq,
                const float* __restrict__ row_factor, const float* __restrict__ col_factor,
                StepSums* __restrict__ tile_sums, i64 with_sums) {
    const Tile T = load_tile(tiles, tinfo, blockIdx.x);
    const AdafactorCoef& cf = coef[T.t];
    double s[4] = {0.0, 0.0, 0.0, 0.0};
    if (cf.active != 0.0) {
        const TensorRec& ti = tinfo[T.t];
        const bool factored = ti.rslot >= 0;
        const AdafactorScale sc = scale[T.t];
        const float clip = (float)sc.clip, alpha = (float)sc.alpha, wda = (float)sc.wda;
        const bool b1_on = cf.b1_on != 0.0, wd_on = cf.wd_on != 0.0;
        const float b1 = (float)cf.b1, c1 = (float)cf.c1;
        const i64 c0 = factored ? ti.col + T.b * T.C + T.c0 : 0;
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
        for (i64 i = warp; i < T.nr; i += WARPS) {
            const i64 rp = tile_row_pos(T, i);
            const float rf = factored ? row_factor[ti.row + tile_row(T, i)] : 0.0f;
            float p[CPL], g[CPL], d[CPL];
            bool ok[CPL];
#pragma unroll
            for (int q = 0; q < CPL; ++q) {       // d: col_factor (factored) or v
                const i64 j = lane + 32 * q, pos = rp + j;
                ok[q] = j < T.nc && pos < T.n;
                p[q] = g[q] = d[q] = 0.0f;
                if (ok[q]) {
                    p[q] = param[T.p + pos];
                    g[q] = load_grad(grad, gkind, T.p + pos);
                    d[q] = factored ? col_factor[c0 + j] : exp_avg_sq[ti.v + pos];
                }
            }
#pragma unroll
            for (int q = 0; q < CPL; ++q) {
                if (!ok[q]) continue;
                const i64 pos = rp + lane + 32 * q;
                float u = factored ? rf * d[q] * g[q] : g[q] / sqrtf(d[q]);   // U
                u = u / clip * alpha;
                if (b1_on) {
                    float m = exp_avg[ti.m + pos] * b1;
                    m = m + c1 * u;
                    exp_avg[ti.m + pos] = m;
                    u = m;
                }
                const float nw = (wd_on ? p[q] - wda * p[q] : p[q]) - u;
                param[T.p + pos] = nw;
                if (with_sums) step_terms(s, p[q], nw, g[q]);
            }
        }
    }
    store_tile_sums(s, tile_sums, T.k, with_sums);
}
