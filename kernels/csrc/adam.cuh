// The Adam moments and direction that AdamW, Adam and AdamP share (kernels/adam.py).
#pragma once
#include "common.cuh"

// m <- m + (1-b1)(g - m);  v <- b2*v + (1-b2)*g^2   (float32, the reference's rounding)
__device__ __forceinline__ void adam_moments(float g, float& m, float& v, float c1, float b2, float c2) {
    m = m + c1 * (g - m);
    v = v * b2;
    v = v + c2 * (g * g);
}

// sqrt(v)/sbc2 + eps: eps after the bias-corrected square root, as torch (sbc2 = sqrt(bc2)),
// or Keras's eps hat on the raw square root (sbc2 = 1; kernels/adam.py bias_corrections).
__device__ __forceinline__ float adam_denom(float v, float sbc2, float eps) {
    return sqrtf(v) / sbc2 + eps;
}

// This lane's CPL columns of the tile row starting at rp: theta, g and Adam's m and v
// (zeros where ok is false: past the row's end). Every load is issued before any value is
// used, 16 in flight per thread.
__device__ __forceinline__ void load_adam_row(
        const Tile& T, i64 rp, int lane, const float* __restrict__ param,
        const void* __restrict__ grad, i64 gkind, const float* __restrict__ exp_avg,
        const float* __restrict__ exp_avg_sq, i64 mo, i64 vo,
        float* p, float* g, float* m, float* v, bool* ok) {
#pragma unroll
    for (int q = 0; q < CPL; ++q) {
        const i64 j = lane + 32 * q, pos = rp + j;
        ok[q] = j < T.nc && pos < T.n;
        p[q] = g[q] = m[q] = v[q] = 0.0f;
        if (ok[q]) {
            p[q] = param[T.p + pos];
            g[q] = load_grad(grad, gkind, T.p + pos);
            m[q] = exp_avg[mo + pos];
            v[q] = exp_avg_sq[vo + pos];
        }
    }
}
