// AdamW and Adam, one fused pass (kernels/adam.py):
//   g <- -g if maximize;  g <- g + lambda*theta (Adam, coupled L2)
//   theta <- theta*decay   (AdamW: decay_factor(mode) = 1 - lr*wd | 1 - (lr/lr0)*wd | 1 - wd)
//   m <- m + (1-b1)(g - m);  v <- b2*v + (1-b2)*g^2
//   amsgrad: vmax <- max(vmax, v), and vmax in place of v below
//   theta <- theta - step * m / (sqrt(v)/sbc2 + eps)
// with step = lr/bc1 and sbc2 = sqrt(bc2) (torch's eps), or under eps_mode "keras"
// step = lr*sqrt(bc2)/bc1 and sbc2 = 1 (Keras's eps hat on the raw sqrt(v); /1 is exact).
// decay is 1 unless decoupled decay is on (theta*1 is exact).
#include "adam.cuh"

// Per tensor, formed in float64 on the host.
struct AdamCoef {
    double active;               // 0: leave the tensor alone
    double sign;                 // -1 under maximize
    double l2_on, l2;            // Adam: g <- g + l2*theta
    double decay;                // AdamW: the decoupled decay factor
    double c1, b2, c2;           // 1 - b1, b2, 1 - b2
    double sbc2, eps, step;      // sqrt(1 - b2^t), eps, lr / (1 - b1^t); keras: 1, eps, lr*sbc2/bc1
    double amsgrad;              // 1: keep max_exp_avg_sq (at tinfo.vm) and divide by it
};

extern "C" __global__ void __launch_bounds__(BLOCK)
adam_apply(const TileRec* __restrict__ tiles, const TensorRec* __restrict__ tinfo,
           const AdamCoef* __restrict__ coef, float* __restrict__ param,
           const void* __restrict__ grad, i64 gkind, float* __restrict__ exp_avg,
           float* __restrict__ exp_avg_sq, float* __restrict__ max_exp_avg_sq,
           StepSums* __restrict__ tile_sums, i64 with_sums) {
    const Tile T = load_tile(tiles, tinfo, blockIdx.x);
    const AdamCoef& cf = coef[T.t];
    double s[4] = {0.0, 0.0, 0.0, 0.0};
    if (cf.active != 0.0) {
        const TensorRec& ti = tinfo[T.t];
        const float sign = (float)cf.sign, l2 = (float)cf.l2, decay = (float)cf.decay;
        const float c1 = (float)cf.c1, b2 = (float)cf.b2, c2 = (float)cf.c2;
        const float sbc2 = (float)cf.sbc2, eps = (float)cf.eps, stepsize = (float)cf.step;
        const bool l2_on = cf.l2_on != 0.0, amsgrad = cf.amsgrad != 0.0;
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
        for (i64 i = warp; i < T.nr; i += WARPS) {
            const i64 rp = tile_row_pos(T, i);
            float p[CPL], g[CPL], m[CPL], v[CPL];
            bool ok[CPL];
            load_adam_row(T, rp, lane, param, grad, gkind, exp_avg, exp_avg_sq, ti.m, ti.v, p, g, m, v, ok);
#pragma unroll
            for (int q = 0; q < CPL; ++q) {
                if (!ok[q]) continue;
                const i64 pos = rp + lane + 32 * q;
                float gj = sign * g[q];
                if (l2_on) gj = gj + l2 * p[q];
                adam_moments(gj, m[q], v[q], c1, b2, c2);
                float vd = v[q];
                if (amsgrad) {                      // max keeping a NaN, as torch.maximum
                    const float x = max_exp_avg_sq[ti.vm + pos];
                    vd = (vd > x || vd != vd) ? vd : x;
                    max_exp_avg_sq[ti.vm + pos] = vd;
                }
                const float nw = p[q] * decay - stepsize * (m[q] / adam_denom(vd, sbc2, eps));
                exp_avg[ti.m + pos] = m[q];
                exp_avg_sq[ti.v + pos] = v[q];
                param[T.p + pos] = nw;
                if (with_sums) step_terms(s, p[q], nw, g[q]);
            }
        }
    }
    store_tile_sums(s, tile_sums, T.k, with_sums);
}
