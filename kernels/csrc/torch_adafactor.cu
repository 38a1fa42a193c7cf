// torch.optim.Adafactor (kernels/torch_adafactor.py). Factored tensors (ndim >= 2) in the
// factored view (B = leading dims, R x C = the last two); others in the flat view.
//   g <- -g if maximize;  w = t^beta2_decay;  lerp(a, b) = w < 0.5 ? a + w(b - a) : b - (b - a)(1 - w)
//   alpha = max(eps2, RMS(theta_{t-1})) * min(lr, 1/sqrt(t))
//   R <- lerp(R, mean_cols(g^2));  C <- lerp(C, mean_rows(g^2));  V = (R*C) / max(mean(R), eps1)
//   unfactored: V = v <- lerp(v, g^2)
//   U = (1/sqrt(max(V, eps1^2))) * g;  clip = max(1, RMS(U)/d)
//   theta <- theta*(1 - lr*wd) - (alpha/clip)*U
#include "common.cuh"

// Per tensor, formed in float64 on the host.
struct TorchAdafactorCoef {
    double active;
    double sign;                 // -1 under maximize
    double w, omw, small;        // lerp weight t^beta2_decay, 1 - w (float32), w < 0.5
    double eps1, eps1sq;
    double rho, eps2, d;         // alpha = max(eps2, RMS(theta)) * rho; clip threshold d
    double decay;                // 1 - lr*wd
};

// Per tile: sum theta^2 (for RMS(theta_{t-1})) and sum U^2 (for the clip).
struct TorchAdafactorNorms { double theta_sq, update_sq; };

// Per tensor, decided on the device: the clip divisor and alpha/clip.
struct TorchAdafactorScale { double clip, scale; };

__device__ __forceinline__ float ta_lerp(float a, float b, float w, float omw, bool small) {
    return small ? a + w * (b - a) : b - (b - a) * omw;
}

// max(x, low) keeping a NaN (torch.clamp_min; fmaxf would drop it).
__device__ __forceinline__ float ta_clamp_min(float x, float low) {
    return (x >= low || x != x) ? x : low;
}

// Pass 1, torch_adafactor_sums: norms[k].theta_sq; unfactored tensors: the v update and
// norms[k].update_sq; factored: g^2 partial sums per (row, column strip) and per (column,
// row band).
extern "C" __global__ void __launch_bounds__(BLOCK)
torch_adafactor_sums(const TileRec* __restrict__ tiles, const TensorRec* __restrict__ tinfo,
                     const TorchAdafactorCoef* __restrict__ coef, const float* __restrict__ param,
                     const void* __restrict__ grad, i64 gkind, float* __restrict__ exp_avg_sq,
                     double* __restrict__ row_part, double* __restrict__ col_part,
                     TorchAdafactorNorms* __restrict__ norms) {
    __shared__ double cols[WARPS][TC];
    const Tile T = load_tile(tiles, tinfo, blockIdx.x);
    const TorchAdafactorCoef& cf = coef[T.t];
    double s[4] = {0.0, 0.0, 0.0, 0.0};
    if (cf.active != 0.0) {                             // uniform over the block
        const TensorRec& ti = tinfo[T.t];
        const bool factored = ti.rslot >= 0, small = cf.small != 0.0;
        const float sign = (float)cf.sign, w = (float)cf.w, omw = (float)cf.omw;
        const float eps1sq = (float)cf.eps1sq;
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
                if (factored) {
                    const float g2 = g[q] * g[q];
                    rowsum += (double)g2;
                    colsum[q] += (double)g2;
                } else {
                    const i64 vi = ti.v + rp + lane + 32 * q;
                    const float gs = sign * g[q];
                    const float v = ta_lerp(exp_avg_sq[vi], gs * gs, w, omw, small);
                    exp_avg_sq[vi] = v;
                    const double u = (double)((1.0f / sqrtf(ta_clamp_min(v, eps1sq))) * gs);
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
                for (int w8 = 0; w8 < WARPS; ++w8) c += cols[w8][threadIdx.x];
                const i64 col = T.b * T.C + T.c0 + threadIdx.x;
                col_part[ti.cslot + col * ti.kr + T.r0 / TR] = c;
            }
            __syncthreads();
        }
    }
    block_sum4(s);
    if (threadIdx.x == 0) norms[T.k] = TorchAdafactorNorms{s[0], s[1]};
}

// Pass 2, torch_adafactor_combine, one thread per row entry and per column entry of every
// factored tensor (entries indexed as in exp_avg_sq_row / _col):
//   R <- lerp(R, float32(row_sum/C));  C <- lerp(C, float32(col_sum/R))
extern "C" __global__ void __launch_bounds__(BLOCK)
torch_adafactor_combine(const TensorRec* __restrict__ tinfo,
                        const TorchAdafactorCoef* __restrict__ coef,
                        const i64* __restrict__ row_owner, i64 n_rows,
                        const i64* __restrict__ col_owner, i64 n_cols,
                        const double* __restrict__ row_part, const double* __restrict__ col_part,
                        float* __restrict__ exp_avg_sq_row, float* __restrict__ exp_avg_sq_col) {
    const i64 e = (i64)blockIdx.x * BLOCK + threadIdx.x;
    if (e < n_rows) {
        const i64 t = row_owner[e];
        const TorchAdafactorCoef& cf = coef[t];
        if (cf.active == 0.0) return;
        const TensorRec& ti = tinfo[t];
        const double* part = row_part + ti.rslot + (e - ti.row) * ti.kc;
        double sum = 0.0;
        for (i64 k = 0; k < ti.kc; ++k) sum += part[k];
        exp_avg_sq_row[e] = ta_lerp(exp_avg_sq_row[e], (float)(sum / (double)ti.C), (float)cf.w,
                                    (float)cf.omw, cf.small != 0.0);
    } else if (e < n_rows + n_cols) {
        const i64 ec = e - n_rows, t = col_owner[ec];
        const TorchAdafactorCoef& cf = coef[t];
        if (cf.active == 0.0) return;
        const TensorRec& ti = tinfo[t];
        const double* part = col_part + ti.cslot + (ec - ti.col) * ti.kr;
        double sum = 0.0;
        for (i64 k = 0; k < ti.kr; ++k) sum += part[k];
        exp_avg_sq_col[ec] = ta_lerp(exp_avg_sq_col[ec], (float)(sum / (double)ti.R), (float)cf.w,
                                     (float)cf.omw, cf.small != 0.0);
    }
}

// Pass 3, torch_adafactor_row_means, one warp per (tensor, batch): every row of the batch
// gets row_mean = max(float32(mean(R)), eps1).
extern "C" __global__ void __launch_bounds__(BLOCK)
torch_adafactor_row_means(const i64* __restrict__ batches, i64 n_batches,
                          const TensorRec* __restrict__ tinfo,
                          const TorchAdafactorCoef* __restrict__ coef,
                          const float* __restrict__ exp_avg_sq_row, float* __restrict__ row_mean) {
    const i64 w = (i64)blockIdx.x * WARPS + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (w >= n_batches) return;                         // uniform over the warp
    const i64 t = batches[w * 2], b = batches[w * 2 + 1];
    if (coef[t].active == 0.0) return;
    const TensorRec& ti = tinfo[t];
    const i64 e0 = ti.row + b * ti.R;
    double sum = 0.0;
    for (i64 r = lane; r < ti.R; r += 32) sum += (double)exp_avg_sq_row[e0 + r];
    const float mean = ta_clamp_min((float)(warp_sum(sum) / (double)ti.R), (float)coef[t].eps1);
    for (i64 r = lane; r < ti.R; r += 32) row_mean[e0 + r] = mean;
}

// U of factored tensors: (1/sqrt(max((R*C)/row_mean, eps1^2))) * g, g already signed.
__device__ __forceinline__ float ta_factored_update(float r, float c, float rm, float eps1sq,
                                                    float g) {
    return (1.0f / sqrtf(ta_clamp_min((r * c) / rm, eps1sq))) * g;
}

// Pass 4, torch_adafactor_update_sq (factored tensors): norms[k].update_sq = sum U^2 over the tile.
extern "C" __global__ void __launch_bounds__(BLOCK)
torch_adafactor_update_sq(const TileRec* __restrict__ tiles, const TensorRec* __restrict__ tinfo,
                          const TorchAdafactorCoef* __restrict__ coef, const void* __restrict__ grad,
                          i64 gkind, const float* __restrict__ exp_avg_sq_row,
                          const float* __restrict__ exp_avg_sq_col,
                          const float* __restrict__ row_mean,
                          TorchAdafactorNorms* __restrict__ norms) {
    const Tile T = load_tile(tiles, tinfo, blockIdx.x);
    const TensorRec& ti = tinfo[T.t];
    const TorchAdafactorCoef& cf = coef[T.t];
    if (cf.active == 0.0 || ti.rslot < 0) return;   // uniform
    const float sign = (float)cf.sign, eps1sq = (float)cf.eps1sq;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const i64 c0 = ti.col + T.b * T.C + T.c0;
    double s[4] = {0.0, 0.0, 0.0, 0.0};
    for (i64 i = warp; i < T.nr; i += WARPS) {
        const i64 rp = tile_row_pos(T, i), re = ti.row + tile_row(T, i);
        const float r = exp_avg_sq_row[re], rm = row_mean[re];
        float g[CPL], c[CPL];
#pragma unroll
        for (int q = 0; q < CPL; ++q) {       // every load in flight before any use
            const i64 j = lane + 32 * q;
            g[q] = c[q] = 0.0f;
            if (j < T.nc) {
                g[q] = load_grad(grad, gkind, T.p + rp + j);
                c[q] = exp_avg_sq_col[c0 + j];
            }
        }
#pragma unroll
        for (int q = 0; q < CPL; ++q) {
            if (lane + 32 * q < T.nc) {
                const double u = (double)ta_factored_update(r, c[q], rm, eps1sq, sign * g[q]);
                s[0] += u * u;
            }
        }
    }
    block_sum4(s);
    if (threadIdx.x == 0) norms[T.k].update_sq = s[0];
}

// Pass 5, torch_adafactor_decide, one block per tensor: from its tiles' norms,
//   alpha = max(eps2, sqrt(sum theta^2/n)) * rho;  clip = max(1, sqrt(sum U^2/n)/d)
//   scale[t] = (clip, alpha/clip).
extern "C" __global__ void __launch_bounds__(BLOCK)
torch_adafactor_decide(const TensorRec* __restrict__ tinfo,
                       const TorchAdafactorCoef* __restrict__ coef,
                       const TorchAdafactorNorms* __restrict__ norms,
                       TorchAdafactorScale* __restrict__ scale) {
    const i64 t = blockIdx.x;
    const TensorRec& ti = tinfo[t];
    const TorchAdafactorCoef& cf = coef[t];
    double s[4] = {0.0, 0.0, 0.0, 0.0};
    for (i64 i = threadIdx.x; i < ti.ntiles; i += BLOCK) {
        s[0] += norms[ti.tile0 + i].theta_sq;
        s[1] += norms[ti.tile0 + i].update_sq;
    }
    block_sum4(s);
    if (threadIdx.x == 0) {
        if (cf.active == 0.0) {
            scale[t] = TorchAdafactorScale{1.0, 0.0};
        } else {
            const double n = (double)ti.n;
            const double alpha = fmax(cf.eps2, sqrt(s[0] / n)) * cf.rho;
            const double clip = fmax(1.0, sqrt(s[1] / n) / cf.d);
            scale[t] = TorchAdafactorScale{clip, alpha / clip};
        }
    }
}

// Pass 6, torch_adafactor_apply: theta <- theta*(1 - lr*wd) - (alpha/clip)*U.
extern "C" __global__ void __launch_bounds__(BLOCK)
torch_adafactor_apply(const TileRec* __restrict__ tiles, const TensorRec* __restrict__ tinfo,
                      const TorchAdafactorCoef* __restrict__ coef,
                      const TorchAdafactorScale* __restrict__ scale, float* __restrict__ param,
                      const void* __restrict__ grad, i64 gkind,
                      const float* __restrict__ exp_avg_sq,
                      const float* __restrict__ exp_avg_sq_row,
                      const float* __restrict__ exp_avg_sq_col,
                      const float* __restrict__ row_mean,
                      StepSums* __restrict__ tile_sums, i64 with_sums) {
    const Tile T = load_tile(tiles, tinfo, blockIdx.x);
    const TorchAdafactorCoef& cf = coef[T.t];
    double s[4] = {0.0, 0.0, 0.0, 0.0};
    if (cf.active != 0.0) {
        const TensorRec& ti = tinfo[T.t];
        const bool factored = ti.rslot >= 0;
        const float sc = (float)scale[T.t].scale, decay = (float)cf.decay;
        const float sign = (float)cf.sign, eps1sq = (float)cf.eps1sq;
        const i64 c0 = factored ? ti.col + T.b * T.C + T.c0 : 0;
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
        for (i64 i = warp; i < T.nr; i += WARPS) {
            const i64 rp = tile_row_pos(T, i);
            const i64 re = factored ? ti.row + tile_row(T, i) : 0;
            const float r = factored ? exp_avg_sq_row[re] : 0.0f;
            const float rm = factored ? row_mean[re] : 1.0f;
            float p[CPL], g[CPL], d[CPL];
            bool ok[CPL];
#pragma unroll
            for (int q = 0; q < CPL; ++q) {       // d: C (factored) or v
                const i64 j = lane + 32 * q, pos = rp + j;
                ok[q] = j < T.nc && pos < T.n;
                p[q] = g[q] = d[q] = 0.0f;
                if (ok[q]) {
                    p[q] = param[T.p + pos];
                    g[q] = load_grad(grad, gkind, T.p + pos);
                    d[q] = factored ? exp_avg_sq_col[c0 + j] : exp_avg_sq[ti.v + pos];
                }
            }
#pragma unroll
            for (int q = 0; q < CPL; ++q) {
                if (!ok[q]) continue;
                const float gs = sign * g[q];
                const float u = factored ? ta_factored_update(r, d[q], rm, eps1sq, gs)
                                         : (1.0f / sqrtf(ta_clamp_min(d[q], eps1sq))) * gs;
                const float nw = p[q] * decay - sc * u;
                param[T.p + rp + lane + 32 * q] = nw;
                if (with_sums) step_terms(s, p[q], nw, g[q]);
            }
        }
    }
    store_tile_sums(s, tile_sums, T.k, with_sums);
}
