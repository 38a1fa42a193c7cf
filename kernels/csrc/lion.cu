// Lion (kernels/lion.py), one fused pass over the flat view:
//   g <- -g if maximize
//   c = b1*m + (1-b1)*g;  theta <- theta*decay - lr*sign(c)   (sign(0) = sign(NaN) = 0)
//   m <- b2*m + (1-b2)*g
// decay is the decoupled decay factor of the job's weight_decay_mode (1: no decay).
#include "common.cuh"

// Per tensor, formed in float64 on the host.
struct LionCoef {
    double active, sign, decay, lr;
    double b1, c1, b2, c2;       // b1, 1 - b1, b2, 1 - b2
};

extern "C" __global__ void __launch_bounds__(BLOCK)
lion_apply(const TileRec* __restrict__ tiles, const TensorRec* __restrict__ tinfo,
           const LionCoef* __restrict__ coef, float* __restrict__ param,
           const void* __restrict__ grad, i64 gkind, float* __restrict__ exp_avg,
           StepSums* __restrict__ tile_sums, i64 with_sums) {
    const Tile T = load_tile(tiles, tinfo, blockIdx.x);
    const LionCoef& cf = coef[T.t];
    double s[4] = {0.0, 0.0, 0.0, 0.0};
    if (cf.active != 0.0) {
        const i64 mo = tinfo[T.t].m;
        const float sign = (float)cf.sign, decay = (float)cf.decay, lr = (float)cf.lr;
        const float b1 = (float)cf.b1, c1 = (float)cf.c1, b2 = (float)cf.b2, c2 = (float)cf.c2;
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
        for (i64 i = warp; i < T.nr; i += WARPS) {
            const i64 rp = tile_row_pos(T, i);
            float p[CPL], g[CPL], m[CPL];
            bool ok[CPL];
#pragma unroll
            for (int q = 0; q < CPL; ++q) {   // every load in flight before any is used
                const i64 j = lane + 32 * q, pos = rp + j;
                ok[q] = j < T.nc && pos < T.n;
                p[q] = g[q] = m[q] = 0.0f;
                if (ok[q]) {
                    p[q] = param[T.p + pos];
                    g[q] = load_grad(grad, gkind, T.p + pos);
                    m[q] = exp_avg[mo + pos];
                }
            }
#pragma unroll
            for (int q = 0; q < CPL; ++q) {
                if (!ok[q]) continue;
                const i64 pos = rp + lane + 32 * q;
                const float gj = sign * g[q];
                const float c = b1 * m[q] + c1 * gj;
                const float u = c > 0.0f ? 1.0f : (c < 0.0f ? -1.0f : 0.0f);
                const float nw = p[q] * decay - lr * u;
                exp_avg[mo + pos] = b2 * m[q] + c2 * gj;
                param[T.p + pos] = nw;
                if (with_sums) step_terms(s, p[q], nw, g[q]);
            }
        }
    }
    store_tile_sums(s, tile_sums, T.k, with_sums);
}
