// AdamP (kernels/adamp.py). Candidates: active tensors with ndim > 1, in the channel view
// (rows = shape[0]).
//   m, v <- Adam moments(g);  u = m/denom (or (b1*m + (1-b1)*g)/denom with Nesterov)
//   channel view, then layer view: if every row has |cos(g, theta)| < delta/sqrt(row length),
//     u <- u - theta_hat * sum_row(theta_hat * u),  theta_hat = theta/(|theta|_row + eps)
//   theta <- theta*(1 - lr*wd*r) - (lr/bc1)*u,  r = wd_ratio if projected, else 1
#include "adam.cuh"

// Projection modes.
#define NOT_PROJECTED 0
#define CHANNEL 1
#define LAYER 2

// Per tensor, formed in float64 on the host.
struct AdampCoef {
    double active, candidate;    // candidate: ndim > 1
    double b1, c1, b2, c2;       // b1, 1 - b1, b2, 1 - b2
    double sbc2, eps, step;      // sqrt(1 - b2^t), eps, lr / (1 - b1^t)
    double nesterov, delta, lr, wd, wd_ratio;
};

// Per tensor, decided on the device: the projection mode and the decay factor.
struct AdampDecision { double mode, decay; };

__device__ __forceinline__ float adamp_direction(float g, float m, float v, float sbc2,
                                                 float eps, bool nesterov, float b1, float c1) {
    const float d = adam_denom(v, sbc2, eps);
    if (nesterov) return (b1 * m + c1 * g) / d;
    return m / d;
}

// Pass 1, adamp_sums: per (row, column strip), in float64, over the RAW gradient g:
//   sum g*theta, sum g^2, sum theta^2, and sum theta*u, where u is this step's direction
//   from the moments it will have (computed here, not stored). Since theta_hat =
//   theta/(|theta|_row + eps) with one norm per row (channel) or per tensor (layer),
//   sum_row(theta_hat*u) = sum(theta*u)/norm, so the projection needs no third pass.
extern "C" __global__ void __launch_bounds__(BLOCK)
adamp_sums(const TileRec* __restrict__ tiles, const TensorRec* __restrict__ tinfo,
           const AdampCoef* __restrict__ coef, const float* __restrict__ param,
           const void* __restrict__ grad, i64 gkind, const float* __restrict__ exp_avg,
           const float* __restrict__ exp_avg_sq, double* __restrict__ row_part) {
    const Tile T = load_tile(tiles, tinfo, blockIdx.x);
    const AdampCoef& cf = coef[T.t];
    if (cf.active == 0.0 || cf.candidate == 0.0) return;     // uniform over the block
    const TensorRec& ti = tinfo[T.t];
    const i64 kc = T.c0 / TC;
    const float b1 = (float)cf.b1, c1 = (float)cf.c1, b2 = (float)cf.b2, c2 = (float)cf.c2;
    const float sbc2 = (float)cf.sbc2, eps = (float)cf.eps;
    const bool nesterov = cf.nesterov != 0.0;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (i64 i = warp; i < T.nr; i += WARPS) {
        const i64 rp = tile_row_pos(T, i);
        float p[CPL], g[CPL], m[CPL], v[CPL];
        bool ok[CPL];
        load_adam_row(T, rp, lane, param, grad, gkind, exp_avg, exp_avg_sq, ti.m, ti.v, p, g, m, v, ok);
        double dot = 0.0, gg = 0.0, pp = 0.0, pu = 0.0;
#pragma unroll
        for (int q = 0; q < CPL; ++q) {
            if (!ok[q]) continue;
            adam_moments(g[q], m[q], v[q], c1, b2, c2);
            const double u = (double)adamp_direction(g[q], m[q], v[q], sbc2, eps, nesterov, b1, c1);
            const double gd = (double)g[q], pd = (double)p[q];
            dot += gd * pd;
            gg += gd * gd;
            pp += pd * pd;
            pu += pd * u;
        }
        dot = warp_sum(dot); gg = warp_sum(gg); pp = warp_sum(pp); pu = warp_sum(pu);
        if (lane == 0) {
            double* out = row_part + (ti.rslot + tile_row(T, i) * ti.kc + kc) * 4;
            out[0] = dot; out[1] = gg; out[2] = pp; out[3] = pu;
        }
    }
}

// Pass 2, adamp_decide, one block per tensor: combine each row's strips, then
//   channel: every row has |cos(g, theta)| < delta/sqrt(row length), cos as
//            F.cosine_similarity: |x.y| / (max(|x|, eps) * max(|y|, eps));
//   else layer: the same over the whole tensor, threshold delta/sqrt(numel);
// and for the chosen view per row: pnorm = sqrt(float32(sum theta^2)) + eps (float32, as
// the reference's float32 norm), radial = sum(theta*u)/pnorm. row_scr holds
// (sum theta^2, sum theta*u) per row.
extern "C" __global__ void __launch_bounds__(BLOCK)
adamp_decide(const TensorRec* __restrict__ tinfo, const AdampCoef* __restrict__ coef,
             const double* __restrict__ row_part, double* __restrict__ row_scr,
             float* __restrict__ pnorm, float* __restrict__ radial,
             AdampDecision* __restrict__ decision) {
    const i64 t = blockIdx.x;
    const TensorRec& ti = tinfo[t];
    const AdampCoef& cf = coef[t];
    __shared__ int mode_sh;
    int mode = NOT_PROJECTED;
    double tot[4] = {0.0, 0.0, 0.0, 0.0};
    if (cf.active != 0.0 && cf.candidate != 0.0) {      // uniform over the block
        const double eps = cf.eps;
        const i64 rows = ti.B * ti.R;
        double cmax = 0.0;
        for (i64 r = threadIdx.x; r < rows; r += BLOCK) {
            double s[4] = {0.0, 0.0, 0.0, 0.0};
            for (i64 k = 0; k < ti.kc; ++k)
                for (int c = 0; c < 4; ++c) s[c] += row_part[(ti.rslot + r * ti.kc + k) * 4 + c];
            const double cosr = fabs(s[0]) / (fmax(sqrt(s[1]), eps) * fmax(sqrt(s[2]), eps));
            cmax = nan_max(cmax, cosr);
            for (int c = 0; c < 4; ++c) tot[c] += s[c];
            row_scr[(ti.row + r) * 2 + 0] = s[2];
            row_scr[(ti.row + r) * 2 + 1] = s[3];
        }
        cmax = block_max(cmax);
        block_sum4(tot);
        if (threadIdx.x == 0) {
            const double cosl = fabs(tot[0]) / (fmax(sqrt(tot[1]), eps) * fmax(sqrt(tot[2]), eps));
            mode = cmax < cf.delta / sqrt((double)ti.C) ? CHANNEL
                 : (cosl < cf.delta / sqrt((double)ti.n) ? LAYER : NOT_PROJECTED);
            mode_sh = mode;
        }
        __syncthreads();
        mode = mode_sh;
        if (mode != NOT_PROJECTED) {
            const float epsf = (float)eps;
            const float lnorm = sqrtf((float)tot[2]) + epsf;
            for (i64 r = threadIdx.x; r < rows; r += BLOCK) {
                float pn;
                double pu;
                if (mode == CHANNEL) {
                    pn = sqrtf((float)row_scr[(ti.row + r) * 2 + 0]) + epsf;
                    pu = row_scr[(ti.row + r) * 2 + 1];
                } else {
                    pn = lnorm;
                    pu = tot[3];
                }
                pnorm[ti.row + r] = pn;
                radial[ti.row + r] = (float)(pu / (double)pn);
            }
        }
    }
    if (threadIdx.x == 0) {
        const double ratio = mode != NOT_PROJECTED ? cf.wd_ratio : 1.0;
        decision[t] = AdampDecision{(double)mode, cf.wd > 0.0 ? 1.0 - cf.lr * cf.wd * ratio : 1.0};
    }
}

// Pass 3, adamp_apply, every active tensor:
//   m, v <- moments(g);  u = m/denom (or the Nesterov form)
//   projected: u <- u - (theta/pnorm[row]) * radial[row]
//   theta <- theta*decay - (lr/bc1)*u
extern "C" __global__ void __launch_bounds__(BLOCK)
adamp_apply(const TileRec* __restrict__ tiles, const TensorRec* __restrict__ tinfo,
            const AdampCoef* __restrict__ coef, const AdampDecision* __restrict__ decision,
            const float* __restrict__ pnorm, const float* __restrict__ radial,
            float* __restrict__ param, const void* __restrict__ grad, i64 gkind,
            float* __restrict__ exp_avg, float* __restrict__ exp_avg_sq,
            StepSums* __restrict__ tile_sums, i64 with_sums) {
    const Tile T = load_tile(tiles, tinfo, blockIdx.x);
    const AdampCoef& cf = coef[T.t];
    double s[4] = {0.0, 0.0, 0.0, 0.0};
    if (cf.active != 0.0) {
        const TensorRec& ti = tinfo[T.t];
        const bool projected = decision[T.t].mode != NOT_PROJECTED;
        const float decay = (float)decision[T.t].decay;
        const float b1 = (float)cf.b1, c1 = (float)cf.c1, b2 = (float)cf.b2, c2 = (float)cf.c2;
        const float sbc2 = (float)cf.sbc2, eps = (float)cf.eps, stepsize = (float)cf.step;
        const bool nesterov = cf.nesterov != 0.0;
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
        for (i64 i = warp; i < T.nr; i += WARPS) {
            const i64 rp = tile_row_pos(T, i);
            float pn = 1.0f, rad = 0.0f;
            if (projected) {
                pn = pnorm[ti.row + tile_row(T, i)];
                rad = radial[ti.row + tile_row(T, i)];
            }
            float p[CPL], g[CPL], m[CPL], v[CPL];
            bool ok[CPL];
            load_adam_row(T, rp, lane, param, grad, gkind, exp_avg, exp_avg_sq, ti.m, ti.v, p, g, m, v, ok);
#pragma unroll
            for (int q = 0; q < CPL; ++q) {
                if (!ok[q]) continue;
                const i64 pos = rp + lane + 32 * q;
                adam_moments(g[q], m[q], v[q], c1, b2, c2);
                float u = adamp_direction(g[q], m[q], v[q], sbc2, eps, nesterov, b1, c1);
                if (projected) u = u - (p[q] / pn) * rad;
                const float nw = p[q] * decay - stepsize * u;
                exp_avg[ti.m + pos] = m[q];
                exp_avg_sq[ti.v + pos] = v[q];
                param[T.p + pos] = nw;
                if (with_sums) step_terms(s, p[q], nw, g[q]);
            }
        }
    }
    store_tile_sums(s, tile_sums, T.k, with_sums);
}
