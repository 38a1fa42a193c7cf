"""The CUDA backend: CuPy RawModule kernels over a job's flat buffers.

Same contract as `optserve.kernels.reference.step` and `optserve.kernels.cpu.step`; the
equations are the reference's (shared/OPTIMIZERS.md), restated beside each kernel in
`SOURCE`, and every float32 operation is done in the reference's order. `--fmad=false`
keeps the compiler from fusing a multiply and an add into one FMA, which would round
differently from NumPy; `/` and `sqrtf` are IEEE (NVRTC's default `--prec-div=true
--prec-sqrt=true`). So the Adam family, and AdamP when it does not project, come out
bit-identical to the reference; sums are float64 here (float32 in the reference), so
Adafactor and projected AdamP agree to float32 rounding, as the CPU backend does.

How the work is cut up. Every tensor is viewed as a batch of matrices (B, R, C):
  flat      (1, ceil(n/TC), TC), the last row cut at n     AdamW / Adam, and 0-/1-D tensors
  channel   (1, shape[0], n/shape[0]) if ndim > 1          AdamP (cosine rows, projection)
  factored  (prod(shape[:-2]), shape[-2], shape[-1]) if ndim >= 2   Adafactor (row/col factors)
and every view is cut into *tiles* of at most TR rows x TC columns of one matrix. One
thread block of BLOCK = 256 threads (8 warps) takes one tile: warp w walks rows w, w+8, ...
and lane l columns l, l+32, l+64, l+96, so each row is read with fully coalesced 128-byte
warp loads and each thread has 4 independent elements of every buffer in flight. The
*tile table* (an int64 array, one record per tile of every tensor) maps blocks to
segments, so each kernel is one launch over all tensors however many there are; a
*tensor table* holds each tensor's view, offsets and partial-sum slots, and per-tensor
scalars travel as one float64 array (`coef`, formed in float64 on the host as the
reference does, cast to float32 in the kernels) uploaded once per step.

Reductions never use atomics, so results do not depend on scheduling: every tile writes
its float64 partial sums into its own slots (per tile, per (row, column strip), per
(column, row band)), and a second, segmented kernel combines them (a tensor's tiles, and
a row's strips, are consecutive). The step statistics (Σw², Σw·Δw, Σ‖Δw‖², Σg²) are
summed in the same pass that writes θ; with step(..., stats=False) the kernels that write
θ are told so (`with_stats`, uniform over the grid) and neither sum nor reduce them, and
their segment_sums launch is left out. Launches per step (constant in the tensor count):
AdamW/Adam 2, AdamP 4, Adafactor 7 (one fewer each without the statistics); and one
device-to-host copy of a T x RES_COLS float64 array at the end (which is what
synchronises).

Gradients: float32 (the contract), or 16-bit gradients without a conversion pass:
float16 arrays, and bfloat16 given as uint16 bit patterns (or an ml_dtypes bfloat16 array);
the kernels widen them to float32 on load.

State: `step()` takes a FlatState whose arrays are NumPy (then they are uploaded, stepped
and copied back: correct, but bound by PCIe) or CuPy device arrays (stepped in place; see
`to_device` / `to_host`). A shard's Job still keeps its state in NumPy, so a GPU shard pays
those transfers on every step; keeping the state on the device is the next step for it.

Importing this module needs no GPU and no CuPy: CuPy is imported, and the module compiled
(NVRTC, cached by CuPy on disk), on the first step. `SOURCE` is a complete translation
unit: tests/test_cuda.py compiles it with NVRTC (and nvcc) without a GPU, and also runs it,
through this module's own host code (`use_runtime`), on a C++ host emulation of the CUDA
thread model against the NumPy reference. Kernel scalar arguments are all pointers or
`long long`, which that emulation relies on.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import numpy as np

from optserve.kernels import coefficients
from optserve.kernels.layout import FlatLayout, FlatState

name = "cuda"
# Host state is uploaded and copied back whole on every call, so a step is one call.
STEPS_IN_PARTS = False

# ---------------------------------------------------------------------------------------
# Constants shared by the host code and the kernels (emitted into SOURCE as #defines)
# ---------------------------------------------------------------------------------------
BLOCK = 256          # threads per block
WARPS = BLOCK // 32
TR = 64              # rows per tile: 8 per warp
TC = 128             # columns per tile: 4 per lane
CPL = TC // 32

# Tile record columns (int64): tensor, batch, first row, rows, first column, columns.
TL_T, TL_B, TL_R0, TL_NR, TL_C0, TL_NC = range(6)
TL_COLS = 6

# Tensor table columns (int64). B, R, C: the view; N: numel; P: offset in param/grad;
# M, V: offsets in exp_avg / exp_avg_sq; ROW, COL: where the tensor's row / column results
# start (Adafactor: in exp_avg_sq_row / _col; AdamP: in the row scratch arrays); RSLOT,
# KC: first row partial-sum slot and column strips per row (row r's partials are slots
# RSLOT + r*KC .. + KC); CSLOT, KR: likewise for columns and row bands; TILE0, NTILES:
# the tensor's tiles; NDIM. -1 where a tensor has no such buffer or sums.
(TI_B, TI_R, TI_C, TI_N, TI_P, TI_M, TI_V, TI_ROW, TI_COL, TI_RSLOT, TI_KC, TI_CSLOT, TI_KR,
 TI_TILE0, TI_NTILES, TI_NDIM) = range(16)
TI_COLS = 16

# Per-tensor float64 coefficients, formed on the host every step.
(C_ACTIVE, C_SIGN, C_L2_ON, C_L2, C_DECAY, C_B1, C_C1, C_B2, C_C2, C_SBC2, C_EPS, C_STEP,
 C_NESTEROV, C_CAND, C_DELTA, C_LR, C_WD, C_WD_RATIO,
 C_B2T, C_C2T, C_RHO, C_SCALE_ON, C_EPS2, C_CLIP_T, C_FB1_ON, C_FB1, C_FC1, C_WD_ON) = range(28)
C_COLS = 28

# Per-tensor float64 results, written on the device, copied back once per step.
(R_W2, R_WDW, R_DW2, R_G2, R_CLIP, R_PROJECTED, R_DECAY, R_ALPHA, R_WDA) = range(9)
R_COLS = 9

# The step statistics' keys in step()'s result, in the order of their R_ columns.
STEP_SUMS = ("w2", "wdw", "dw2", "g2")

# Gradient encodings.
GK_F32, GK_BF16, GK_F16 = 0, 1, 2

# AdamP projection modes (cpu.py's).
NOT_PROJECTED, CHANNEL, LAYER = 0, 1, 2


def _defines() -> str:
    names = {k: v for k, v in globals().items()
             if k.isupper() and isinstance(v, int) and not isinstance(v, bool)
             and k.split("_")[0] in ("BLOCK", "WARPS", "TR", "TC", "CPL", "TL", "TI", "C", "R",
                                     "GK", "NOT", "CHANNEL", "LAYER")}
    return "\n".join(f"#define {k} {v}" for k, v in sorted(names.items()))


_BODY = r"""
// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------
typedef long long i64;

// A tile of a tensor's (B, R, C) view; pos(i, j) is the tensor-relative flat index of
// tile element (row i, column j), valid when j < nc and pos < n (the flat view's last
// row is cut at n).
struct Tile {
    i64 k, t, b, r0, nr, c0, nc, R, C, n, p;
};

__device__ __forceinline__ Tile load_tile(const i64* __restrict__ tiles,
                                          const i64* __restrict__ tinfo, i64 k) {
    Tile T;
    const i64* tl = tiles + k * TL_COLS;
    T.k = k;
    T.t = tl[TL_T]; T.b = tl[TL_B]; T.r0 = tl[TL_R0]; T.nr = tl[TL_NR];
    T.c0 = tl[TL_C0]; T.nc = tl[TL_NC];
    const i64* ti = tinfo + T.t * TI_COLS;
    T.R = ti[TI_R]; T.C = ti[TI_C]; T.n = ti[TI_N]; T.p = ti[TI_P];
    return T;
}

// Matrix row (among the tensor's B*R rows) of tile row i, and the flat index of its first
// element in the tile.
__device__ __forceinline__ i64 tile_row(const Tile& T, i64 i) { return T.b * T.R + T.r0 + i; }
__device__ __forceinline__ i64 tile_row_pos(const Tile& T, i64 i) { return tile_row(T, i) * T.C + T.c0; }

__device__ __forceinline__ float bits_to_float(unsigned int u) { return __uint_as_float(u); }

// IEEE half -> float, exact (subnormals: man * 2^-24 is exact in float32).
__device__ __forceinline__ float half_to_float(unsigned int h) {
    const unsigned int sign = (h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, man = h & 0x3ffu;
    if (e == 0x1fu) return bits_to_float(sign | 0x7f800000u | (man << 13));
    if (e != 0u) return bits_to_float(sign | ((e + 112u) << 23) | (man << 13));
    const float f = (float)man * 5.9604644775390625e-08f;
    return sign ? -f : f;
}

// g[i] as float32, from float32, bfloat16 bits (the high half of a float32) or float16.
__device__ __forceinline__ float load_grad(const void* __restrict__ g, i64 gkind, i64 i) {
    if (gkind == GK_F32) return ((const float*)g)[i];
    const unsigned int h = ((const unsigned short*)g)[i];
    if (gkind == GK_BF16) return bits_to_float(h << 16);
    return half_to_float(h);
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

// Sum over the warp; every lane gets the same bits (xor butterfly: a+b == b+a).
__device__ __forceinline__ double warp_sum(double x) {
    for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
    return x;
}

// max that propagates NaN (numpy's max does, and NaN < threshold is then false).
__device__ __forceinline__ double nan_max(double a, double b) {
    return (a != a || b > a) ? b : a;
}

__device__ __forceinline__ double warp_max(double x) {
    for (int o = 16; o > 0; o >>= 1) x = nan_max(x, __shfl_xor_sync(0xffffffffu, x, o));
    return x;
}

// Sums of 4 values over the block, in a fixed order; the result is valid in every thread.
// All threads of the block must call it. (Always 4 wide, with constant indices, so that
// v stays in registers.)
__device__ void block_sum4(double* v) {
    __shared__ double part[WARPS][4];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
        const double s = warp_sum(v[c]);
        if (lane == 0) part[warp][c] = s;
    }
    __syncthreads();
#pragma unroll
    for (int c = 0; c < 4; ++c) {
        double s = 0.0;
        for (int w = 0; w < WARPS; ++w) s += part[w][c];
        v[c] = s;
    }
    __syncthreads();   // part may be reused by the next call
}

// v[c] for a run-time c < 4, without indexing a register array at run time.
__device__ __forceinline__ double pick4(const double* v, i64 c) {
    return c == 0 ? v[0] : (c == 1 ? v[1] : (c == 2 ? v[2] : v[3]));
}

__device__ double block_max(double x) {
    __shared__ double part[WARPS];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    x = warp_max(x);
    if (lane == 0) part[warp] = x;
    __syncthreads();
    double m = part[0];
    for (int w = 1; w < WARPS; ++w) m = nan_max(m, part[w]);
    __syncthreads();
    return m;
}

// The step statistics of one element, in float64: w = old θ, Δw = new θ − old θ.
__device__ __forceinline__ void step_terms(double* s, float old, float nw, float g) {
    const double w = (double)old, dw = (double)nw - w, gd = (double)g;
    s[0] += w * w;
    s[1] += w * dw;
    s[2] += dw * dw;
    s[3] += gd * gd;
}

// m <- m + (1-b1)(g - m);  v <- b2*v + (1-b2)*g^2   (float32, the reference's rounding)
__device__ __forceinline__ void adam_moments(float g, float& m, float& v, float c1, float b2, float c2) {
    m = m + c1 * (g - m);
    v = v * b2;
    v = v + c2 * (g * g);
}

// sqrt(v)/sqrt(bc2) + eps: eps after the bias-corrected square root, as torch.
__device__ __forceinline__ float adam_denom(float v, float sbc2, float eps) {
    return sqrtf(v) / sbc2 + eps;
}

// ---------------------------------------------------------------------------------------
// Segmented sums of per-tile partials: block t sums the rows [TILE0, TILE0 + NTILES) of
// part (width columns) into res[t, col0 .. col0 + width).
// ---------------------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(BLOCK)
segment_sums(const i64* __restrict__ tinfo, const double* __restrict__ part, i64 width,
             double* __restrict__ res, i64 col0) {
    const i64 t = blockIdx.x;
    const i64* ti = tinfo + t * TI_COLS;
    const i64 first = ti[TI_TILE0], count = ti[TI_NTILES];
    double s[4] = {0.0, 0.0, 0.0, 0.0};
    for (i64 i = threadIdx.x; i < count; i += BLOCK) {
#pragma unroll
        for (int c = 0; c < 4; ++c)
            if (c < width) s[c] += part[(first + i) * width + c];
    }
    block_sum4(s);
    if (threadIdx.x < width) res[t * R_COLS + col0 + threadIdx.x] = pick4(s, threadIdx.x);
}

// ---------------------------------------------------------------------------------------
// AdamW / Adam, one fused pass (reference.adamw, reference.adam):
//   g <- -g if maximize;  g <- g + lambda*theta (Adam, coupled L2)
//   theta <- theta*decay   (AdamW: decay_factor(mode) = 1 - lr*wd | 1 - (lr/lr0)*wd | 1 - wd)
//   m <- m + (1-b1)(g - m);  v <- b2*v + (1-b2)*g^2
//   theta <- theta - (lr/bc1) * m / (sqrt(v)/sqrt(bc2) + eps)
// decay is 1 unless decoupled decay is on (theta*1 is exact). tile_stats[k] = the tile's
// step sums (w2, wdw, dw2, g2), if with_stats (else nothing is summed nor written).
// ---------------------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(BLOCK)
adam_apply(const i64* __restrict__ tiles, const i64* __restrict__ tinfo,
           const double* __restrict__ coef, float* __restrict__ param,
           const void* __restrict__ grad, i64 gkind, float* __restrict__ exp_avg,
           float* __restrict__ exp_avg_sq, double* __restrict__ tile_stats, i64 with_stats) {
    const Tile T = load_tile(tiles, tinfo, blockIdx.x);
    const double* cf = coef + T.t * C_COLS;
    double s[4] = {0.0, 0.0, 0.0, 0.0};
    if (cf[C_ACTIVE] != 0.0) {
        const i64* ti = tinfo + T.t * TI_COLS;
        const i64 mo = ti[TI_M], vo = ti[TI_V];
        const float sign = (float)cf[C_SIGN], l2 = (float)cf[C_L2], decay = (float)cf[C_DECAY];
        const float c1 = (float)cf[C_C1], b2 = (float)cf[C_B2], c2 = (float)cf[C_C2];
        const float sbc2 = (float)cf[C_SBC2], eps = (float)cf[C_EPS], stepsize = (float)cf[C_STEP];
        const bool l2_on = cf[C_L2_ON] != 0.0;
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
        for (i64 i = warp; i < T.nr; i += WARPS) {
            const i64 rp = tile_row_pos(T, i);
            float p[CPL], g[CPL], m[CPL], v[CPL];
            bool ok[CPL];
            load_adam_row(T, rp, lane, param, grad, gkind, exp_avg, exp_avg_sq, mo, vo, p, g, m, v, ok);
#pragma unroll
            for (int q = 0; q < CPL; ++q) {
                if (!ok[q]) continue;
                const i64 pos = rp + lane + 32 * q;
                float gj = sign * g[q];
                if (l2_on) gj = gj + l2 * p[q];
                adam_moments(gj, m[q], v[q], c1, b2, c2);
                const float nw = p[q] * decay - stepsize * (m[q] / adam_denom(v[q], sbc2, eps));
                exp_avg[mo + pos] = m[q];
                exp_avg_sq[vo + pos] = v[q];
                param[T.p + pos] = nw;
                if (with_stats) step_terms(s, p[q], nw, g[q]);
            }
        }
    }
    if (with_stats) {                                   // uniform over the grid
        block_sum4(s);
        if (threadIdx.x < 4) tile_stats[T.k * 4 + threadIdx.x] = pick4(s, threadIdx.x);
    }
}

// ---------------------------------------------------------------------------------------
// AdamP (reference.adamp, reference.adamp_projection). Candidates: active tensors with
// ndim > 1, in the channel view (rows = shape[0]).
// Pass 1, adamp_sums: per (row, column strip), in float64, over the RAW gradient g:
//   sum g*theta, sum g^2, sum theta^2, and sum theta*u, where u is this step's direction
//   m'/denom (or (b1*m' + (1-b1)*g)/denom with Nesterov) from the moments m', v' it will
//   have (computed here, not stored). Since theta_hat = theta/(|theta|_row + eps) with one
//   norm per row (channel) or per tensor (layer), sum_row(theta_hat*u) = sum(theta*u)/norm,
//   so the projection needs no third pass.
// ---------------------------------------------------------------------------------------
__device__ __forceinline__ float adamp_direction(float g, float m, float v, float sbc2,
                                                 float eps, bool nesterov, float b1, float c1) {
    const float d = adam_denom(v, sbc2, eps);
    if (nesterov) return (b1 * m + c1 * g) / d;
    return m / d;
}

extern "C" __global__ void __launch_bounds__(BLOCK)
adamp_sums(const i64* __restrict__ tiles, const i64* __restrict__ tinfo,
           const double* __restrict__ coef, const float* __restrict__ param,
           const void* __restrict__ grad, i64 gkind, const float* __restrict__ exp_avg,
           const float* __restrict__ exp_avg_sq, double* __restrict__ row_part) {
    const Tile T = load_tile(tiles, tinfo, blockIdx.x);
    const double* cf = coef + T.t * C_COLS;
    if (cf[C_ACTIVE] == 0.0 || cf[C_CAND] == 0.0) return;     // uniform over the block
    const i64* ti = tinfo + T.t * TI_COLS;
    const i64 mo = ti[TI_M], vo = ti[TI_V], kc = T.c0 / TC;
    const i64 rslot = ti[TI_RSLOT], nkc = ti[TI_KC];
    const float b1 = (float)cf[C_B1], c1 = (float)cf[C_C1], b2 = (float)cf[C_B2], c2 = (float)cf[C_C2];
    const float sbc2 = (float)cf[C_SBC2], eps = (float)cf[C_EPS];
    const bool nesterov = cf[C_NESTEROV] != 0.0;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (i64 i = warp; i < T.nr; i += WARPS) {
        const i64 rp = tile_row_pos(T, i);
        float p[CPL], g[CPL], m[CPL], v[CPL];
        bool ok[CPL];
        load_adam_row(T, rp, lane, param, grad, gkind, exp_avg, exp_avg_sq, mo, vo, p, g, m, v, ok);
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
            double* out = row_part + (rslot + tile_row(T, i) * nkc + kc) * 4;
            out[0] = dot; out[1] = gg; out[2] = pp; out[3] = pu;
        }
    }
}

// Pass 2, adamp_decide, one block per tensor: combine each row's strips, then
//   channel: every row has |cos(g, theta)| < delta/sqrt(row length), cos as
//            F.cosine_similarity: |x.y| / (max(|x|, eps) * max(|y|, eps));
//   else layer: the same over the whole tensor, threshold delta/sqrt(numel);
// and for the chosen view per row: pnorm = sqrt(float32(sum theta^2)) + eps (float32, as
// the reference's float32 norm), radial = sum(theta*u)/pnorm. Writes res[t, PROJECTED]
// (the mode: 0, 1 channel, 2 layer) and res[t, DECAY] = 1 - lr*wd*r (r = wd_ratio if
// projected, else 1; 1 when wd <= 0). row_scr holds (sum theta^2, sum theta*u) per row.
extern "C" __global__ void __launch_bounds__(BLOCK)
adamp_decide(const i64* __restrict__ tinfo, const double* __restrict__ coef,
             const double* __restrict__ row_part, double* __restrict__ row_scr,
             float* __restrict__ pnorm, float* __restrict__ radial, double* __restrict__ res) {
    const i64 t = blockIdx.x;
    const i64* ti = tinfo + t * TI_COLS;
    const double* cf = coef + t * C_COLS;
    __shared__ int mode_sh;
    int mode = NOT_PROJECTED;
    double tot[4] = {0.0, 0.0, 0.0, 0.0};
    const bool cand = cf[C_ACTIVE] != 0.0 && cf[C_CAND] != 0.0;
    if (cand) {                                          // uniform over the block
        const double eps = cf[C_EPS];
        const i64 rows = ti[TI_B] * ti[TI_R], row0 = ti[TI_ROW];
        const i64 rslot = ti[TI_RSLOT], nkc = ti[TI_KC];
        double cmax = 0.0;
        for (i64 r = threadIdx.x; r < rows; r += BLOCK) {
            double s[4] = {0.0, 0.0, 0.0, 0.0};
            for (i64 k = 0; k < nkc; ++k)
                for (int c = 0; c < 4; ++c) s[c] += row_part[(rslot + r * nkc + k) * 4 + c];
            const double cosr = fabs(s[0]) / (fmax(sqrt(s[1]), eps) * fmax(sqrt(s[2]), eps));
            cmax = nan_max(cmax, cosr);
            for (int c = 0; c < 4; ++c) tot[c] += s[c];
            row_scr[(row0 + r) * 2 + 0] = s[2];
            row_scr[(row0 + r) * 2 + 1] = s[3];
        }
        cmax = block_max(cmax);
        block_sum4(tot);
        if (threadIdx.x == 0) {
            const double delta = cf[C_DELTA];
            const double cosl = fabs(tot[0]) / (fmax(sqrt(tot[1]), eps) * fmax(sqrt(tot[2]), eps));
            mode = cmax < delta / sqrt((double)ti[TI_C]) ? CHANNEL
                 : (cosl < delta / sqrt((double)ti[TI_N]) ? LAYER : NOT_PROJECTED);
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
                    pn = sqrtf((float)row_scr[(row0 + r) * 2 + 0]) + epsf;
                    pu = row_scr[(row0 + r) * 2 + 1];
                } else {
                    pn = lnorm;
                    pu = tot[3];
                }
                pnorm[row0 + r] = pn;
                radial[row0 + r] = (float)(pu / (double)pn);
            }
        }
    }
    if (threadIdx.x == 0) {
        const double wd = cf[C_WD];
        const double ratio = mode != NOT_PROJECTED ? cf[C_WD_RATIO] : 1.0;
        res[t * R_COLS + R_PROJECTED] = (double)mode;
        res[t * R_COLS + R_DECAY] = wd > 0.0 ? 1.0 - cf[C_LR] * wd * ratio : 1.0;
    }
}

// Pass 3, adamp_apply, every active tensor:
//   m, v <- moments(g);  u = m/denom (or the Nesterov form)
//   projected: u <- u - (theta/pnorm[row]) * radial[row]
//   theta <- theta*decay - (lr/bc1)*u
// tile_stats[k] = the tile's step sums, if with_stats.
extern "C" __global__ void __launch_bounds__(BLOCK)
adamp_apply(const i64* __restrict__ tiles, const i64* __restrict__ tinfo,
            const double* __restrict__ coef, const double* __restrict__ res,
            const float* __restrict__ pnorm, const float* __restrict__ radial,
            float* __restrict__ param, const void* __restrict__ grad, i64 gkind,
            float* __restrict__ exp_avg, float* __restrict__ exp_avg_sq,
            double* __restrict__ tile_stats, i64 with_stats) {
    const Tile T = load_tile(tiles, tinfo, blockIdx.x);
    const double* cf = coef + T.t * C_COLS;
    double s[4] = {0.0, 0.0, 0.0, 0.0};
    if (cf[C_ACTIVE] != 0.0) {
        const i64* ti = tinfo + T.t * TI_COLS;
        const i64 mo = ti[TI_M], vo = ti[TI_V], row0 = ti[TI_ROW];
        const bool projected = res[T.t * R_COLS + R_PROJECTED] != 0.0;
        const float decay = (float)res[T.t * R_COLS + R_DECAY];
        const float b1 = (float)cf[C_B1], c1 = (float)cf[C_C1], b2 = (float)cf[C_B2], c2 = (float)cf[C_C2];
        const float sbc2 = (float)cf[C_SBC2], eps = (float)cf[C_EPS], stepsize = (float)cf[C_STEP];
        const bool nesterov = cf[C_NESTEROV] != 0.0;
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
        for (i64 i = warp; i < T.nr; i += WARPS) {
            const i64 rp = tile_row_pos(T, i);
            float pn = 1.0f, rad = 0.0f;
            if (projected) {
                pn = pnorm[row0 + tile_row(T, i)];
                rad = radial[row0 + tile_row(T, i)];
            }
            float p[CPL], g[CPL], m[CPL], v[CPL];
            bool ok[CPL];
            load_adam_row(T, rp, lane, param, grad, gkind, exp_avg, exp_avg_sq, mo, vo, p, g, m, v, ok);
#pragma unroll
            for (int q = 0; q < CPL; ++q) {
                if (!ok[q]) continue;
                const i64 pos = rp + lane + 32 * q;
                adam_moments(g[q], m[q], v[q], c1, b2, c2);
                float u = adamp_direction(g[q], m[q], v[q], sbc2, eps, nesterov, b1, c1);
                if (projected) u = u - (p[q] / pn) * rad;
                const float nw = p[q] * decay - stepsize * u;
                exp_avg[mo + pos] = m[q];
                exp_avg_sq[vo + pos] = v[q];
                param[T.p + pos] = nw;
                if (with_stats) step_terms(s, p[q], nw, g[q]);
            }
        }
    }
    if (with_stats) {                                   // uniform over the grid
        block_sum4(s);
        if (threadIdx.x < 4) tile_stats[T.k * 4 + threadIdx.x] = pick4(s, threadIdx.x);
    }
}

// ---------------------------------------------------------------------------------------
// Adafactor (reference.adafactor; HF transformers semantics). Factored tensors (ndim >= 2)
// in the factored view (B = leading dims, R x C = the last two); others in the flat view.
//   b2t = 1 - t^decay_rate;  g2 = g*g + eps1
//   R <- b2t*R + (1-b2t)*mean_cols(g2);  C <- b2t*C + (1-b2t)*mean_rows(g2)
//   row_factor = 1/sqrt(R/mean(R));  col_factor = 1/sqrt(C);  U = (row_factor*col_factor)*g
//   unfactored: v <- b2t*v + (1-b2t)*g2;  U = g/sqrt(v)
//   alpha = max(eps2, RMS(theta_{t-1}))*rho (or rho);  clip = max(1, RMS(U)/d)
//   u = U/clip*alpha;  beta1: m <- b1*m + (1-b1)*u, u = m
//   theta <- theta - (wd*alpha)*theta;  theta <- theta - u
// Pass 1, adafactor_sums: aux[k] = (sum theta^2, sum U^2 of unfactored tensors);
// factored: g2 partial sums per (row, column strip) and per (column, row band);
// unfactored: the v update.
// ---------------------------------------------------------------------------------------
extern "C" __global__ void __launch_bounds__(BLOCK)
adafactor_sums(const i64* __restrict__ tiles, const i64* __restrict__ tinfo,
               const double* __restrict__ coef, const float* __restrict__ param,
               const void* __restrict__ grad, i64 gkind, float* __restrict__ exp_avg_sq,
               double* __restrict__ row_part, double* __restrict__ col_part,
               double* __restrict__ aux) {
    __shared__ double cols[WARPS][TC];
    const Tile T = load_tile(tiles, tinfo, blockIdx.x);
    const double* cf = coef + T.t * C_COLS;
    double s[4] = {0.0, 0.0, 0.0, 0.0};
    if (cf[C_ACTIVE] != 0.0) {                          // uniform over the block
        const i64* ti = tinfo + T.t * TI_COLS;
        const bool factored = ti[TI_RSLOT] >= 0;
        const float eps1 = (float)cf[C_EPS], b2t = (float)cf[C_B2T], c2t = (float)cf[C_C2T];
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
                    const i64 vi = ti[TI_V] + rp + lane + 32 * q;
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
                    row_part[ti[TI_RSLOT] + tile_row(T, i) * ti[TI_KC] + T.c0 / TC] = rowsum;
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
                col_part[ti[TI_CSLOT] + col * ti[TI_KR] + T.r0 / TR] = c;
            }
            __syncthreads();
        }
    }
    block_sum4(s);
    if (threadIdx.x < 2) aux[T.k * 2 + threadIdx.x] = pick4(s, threadIdx.x);
}

// Pass 2, adafactor_combine, one thread per row entry and per column entry of every
// factored tensor (entries indexed as in exp_avg_sq_row / _col):
//   R <- b2t*R + (1-b2t)*float32(row_sum/C);  C <- b2t*C + (1-b2t)*float32(col_sum/R)
//   col_factor = 1/sqrt(C)
extern "C" __global__ void __launch_bounds__(BLOCK)
adafactor_combine(const i64* __restrict__ tinfo, const double* __restrict__ coef,
                  const i64* __restrict__ row_owner, i64 n_rows,
                  const i64* __restrict__ col_owner, i64 n_cols,
                  const double* __restrict__ row_part, const double* __restrict__ col_part,
                  float* __restrict__ exp_avg_sq_row, float* __restrict__ exp_avg_sq_col,
                  float* __restrict__ col_factor) {
    const i64 e = (i64)blockIdx.x * BLOCK + threadIdx.x;
    if (e < n_rows) {
        const i64 t = row_owner[e];
        const double* cf = coef + t * C_COLS;
        if (cf[C_ACTIVE] == 0.0) return;
        const i64* ti = tinfo + t * TI_COLS;
        const i64 local = e - ti[TI_ROW], nk = ti[TI_KC];
        const double* part = row_part + ti[TI_RSLOT] + local * nk;
        double sum = 0.0;
        for (i64 k = 0; k < nk; ++k) sum += part[k];
        const float b2t = (float)cf[C_B2T], c2t = (float)cf[C_C2T];
        exp_avg_sq_row[e] = exp_avg_sq_row[e] * b2t + c2t * (float)(sum / (double)ti[TI_C]);
    } else if (e < n_rows + n_cols) {
        const i64 ec = e - n_rows, t = col_owner[ec];
        const double* cf = coef + t * C_COLS;
        if (cf[C_ACTIVE] == 0.0) return;
        const i64* ti = tinfo + t * TI_COLS;
        const i64 local = ec - ti[TI_COL], nk = ti[TI_KR];
        const double* part = col_part + ti[TI_CSLOT] + local * nk;
        double sum = 0.0;
        for (i64 k = 0; k < nk; ++k) sum += part[k];
        const float b2t = (float)cf[C_B2T], c2t = (float)cf[C_C2T];
        const float c = exp_avg_sq_col[ec] * b2t + c2t * (float)(sum / (double)ti[TI_R]);
        exp_avg_sq_col[ec] = c;
        col_factor[ec] = 1.0f / sqrtf(c);
    }
}

// Pass 3, adafactor_row_factors, one warp per (tensor, batch):
//   row_factor = 1/sqrt(R/float32(mean(R)))
extern "C" __global__ void __launch_bounds__(BLOCK)
adafactor_row_factors(const i64* __restrict__ batches, i64 n_batches,
                      const i64* __restrict__ tinfo, const double* __restrict__ coef,
                      const float* __restrict__ exp_avg_sq_row, float* __restrict__ row_factor) {
    const i64 w = (i64)blockIdx.x * WARPS + (threadIdx.x >> 5);
    const int lane = threadIdx.x & 31;
    if (w >= n_batches) return;                         // uniform over the warp
    const i64 t = batches[w * 2], b = batches[w * 2 + 1];
    if (coef[t * C_COLS + C_ACTIVE] == 0.0) return;
    const i64* ti = tinfo + t * TI_COLS;
    const i64 R = ti[TI_R], e0 = ti[TI_ROW] + b * R;
    double sum = 0.0;
    for (i64 r = lane; r < R; r += 32) sum += (double)exp_avg_sq_row[e0 + r];
    const float mean = (float)(warp_sum(sum) / (double)R);
    for (i64 r = lane; r < R; r += 32) row_factor[e0 + r] = 1.0f / sqrtf(exp_avg_sq_row[e0 + r] / mean);
}

// Pass 4, adafactor_update_sq (factored tensors): aux[k, 1] = sum U^2 over the tile.
extern "C" __global__ void __launch_bounds__(BLOCK)
adafactor_update_sq(const i64* __restrict__ tiles, const i64* __restrict__ tinfo,
                    const double* __restrict__ coef, const void* __restrict__ grad, i64 gkind,
                    const float* __restrict__ row_factor, const float* __restrict__ col_factor,
                    double* __restrict__ aux) {
    const Tile T = load_tile(tiles, tinfo, blockIdx.x);
    const i64* ti = tinfo + T.t * TI_COLS;
    if (coef[T.t * C_COLS + C_ACTIVE] == 0.0 || ti[TI_RSLOT] < 0) return;  // uniform
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const i64 c0 = ti[TI_COL] + T.b * T.C + T.c0;
    double s[4] = {0.0, 0.0, 0.0, 0.0};
    for (i64 i = warp; i < T.nr; i += WARPS) {
        const i64 rp = tile_row_pos(T, i);
        const float rf = row_factor[ti[TI_ROW] + tile_row(T, i)];
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
    if (threadIdx.x == 0) aux[T.k * 2 + 1] = s[0];
}

// Pass 5, adafactor_decide, one block per tensor: from the tensor's tiles' aux sums,
//   alpha = (scale_parameter ? max(eps2, sqrt(sum theta^2/n)) : 1) * rho
//   clip = max(1, sqrt(sum U^2/n)/clip_threshold);  res[t] gets alpha, clip, wd*alpha.
extern "C" __global__ void __launch_bounds__(BLOCK)
adafactor_decide(const i64* __restrict__ tinfo, const double* __restrict__ coef,
                 const double* __restrict__ aux, double* __restrict__ res) {
    const i64 t = blockIdx.x;
    const i64* ti = tinfo + t * TI_COLS;
    const double* cf = coef + t * C_COLS;
    const i64 first = ti[TI_TILE0], count = ti[TI_NTILES];
    double s[4] = {0.0, 0.0, 0.0, 0.0};
    for (i64 i = threadIdx.x; i < count; i += BLOCK) {
        s[0] += aux[(first + i) * 2];
        s[1] += aux[(first + i) * 2 + 1];
    }
    block_sum4(s);
    if (threadIdx.x == 0) {
        double* r = res + t * R_COLS;
        if (cf[C_ACTIVE] == 0.0) {
            r[R_CLIP] = 1.0; r[R_ALPHA] = 0.0; r[R_WDA] = 0.0;
        } else {
            const double n = (double)ti[TI_N];
            const double scale = cf[C_SCALE_ON] != 0.0 ? fmax(cf[C_EPS2], sqrt(s[0] / n)) : 1.0;
            const double alpha = scale * cf[C_RHO];
            r[R_ALPHA] = alpha;
            r[R_CLIP] = fmax(1.0, sqrt(s[1] / n) / cf[C_CLIP_T]);
            r[R_WDA] = cf[C_WD] * alpha;
        }
    }
}

// Pass 6, adafactor_apply: u = U/clip*alpha;  beta1: m <- b1*m + (1-b1)*u, u = m;
//   theta <- theta - (wd*alpha)*theta (if wd != 0);  theta <- theta - u.
// tile_stats[k] = the tile's step sums, if with_stats.
extern "C" __global__ void __launch_bounds__(BLOCK)
adafactor_apply(const i64* __restrict__ tiles, const i64* __restrict__ tinfo,
                const double* __restrict__ coef, const double* __restrict__ res,
                float* __restrict__ param, const void* __restrict__ grad, i64 gkind,
                float* __restrict__ exp_avg, const float* __restrict__ exp_avg_sq,
                const float* __restrict__ row_factor, const float* __restrict__ col_factor,
                double* __restrict__ tile_stats, i64 with_stats) {
    const Tile T = load_tile(tiles, tinfo, blockIdx.x);
    const double* cf = coef + T.t * C_COLS;
    double s[4] = {0.0, 0.0, 0.0, 0.0};
    if (cf[C_ACTIVE] != 0.0) {
        const i64* ti = tinfo + T.t * TI_COLS;
        const bool factored = ti[TI_RSLOT] >= 0;
        const i64 mo = ti[TI_M], vo = ti[TI_V];
        const double* r = res + T.t * R_COLS;
        const float clip = (float)r[R_CLIP], alpha = (float)r[R_ALPHA], wda = (float)r[R_WDA];
        const bool b1_on = cf[C_FB1_ON] != 0.0, wd_on = cf[C_WD_ON] != 0.0;
        const float b1 = (float)cf[C_FB1], c1 = (float)cf[C_FC1];
        const i64 c0 = factored ? ti[TI_COL] + T.b * T.C + T.c0 : 0;
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
        for (i64 i = warp; i < T.nr; i += WARPS) {
            const i64 rp = tile_row_pos(T, i);
            const float rf = factored ? row_factor[ti[TI_ROW] + tile_row(T, i)] : 0.0f;
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
                    d[q] = factored ? col_factor[c0 + j] : exp_avg_sq[vo + pos];
                }
            }
#pragma unroll
            for (int q = 0; q < CPL; ++q) {
                if (!ok[q]) continue;
                const i64 pos = rp + lane + 32 * q;
                float u = factored ? rf * d[q] * g[q] : g[q] / sqrtf(d[q]);   // U
                u = u / clip * alpha;
                if (b1_on) {
                    float m = exp_avg[mo + pos] * b1;
                    m = m + c1 * u;
                    exp_avg[mo + pos] = m;
                    u = m;
                }
                const float nw = (wd_on ? p[q] - wda * p[q] : p[q]) - u;
                param[T.p + pos] = nw;
                if (with_stats) step_terms(s, p[q], nw, g[q]);
            }
        }
    }
    if (with_stats) {                                   // uniform over the grid
        block_sum4(s);
        if (threadIdx.x < 4) tile_stats[T.k * 4 + threadIdx.x] = pick4(s, threadIdx.x);
    }
}
"""

SOURCE = ("// optserve CUDA kernels (generated constants first, then the kernels).\n"
          + _defines() + "\n" + _BODY)

# Every kernel in SOURCE, for the compile checks.
KERNELS = ("segment_sums", "adam_apply", "adamp_sums", "adamp_decide", "adamp_apply",
           "adafactor_sums", "adafactor_combine", "adafactor_row_factors",
           "adafactor_update_sq", "adafactor_decide", "adafactor_apply")

# NVRTC options: C++17, and no FMA contraction (the reference rounds every mul and add).
OPTIONS = ("-std=c++17", "--fmad=false")


# ---------------------------------------------------------------------------------------
# Runtime: CuPy by default; tests may install another with the same methods.
# ---------------------------------------------------------------------------------------

class CupyRuntime:
    """Device arrays, copies and launches through CuPy (imported here, not at module import)."""

    def __init__(self) -> None:
        import cupy
        self.cp = cupy
        self.module = cupy.RawModule(code=SOURCE, options=OPTIONS)
        self._kernels: dict[str, object] = {}
        self.device_name = cupy.cuda.runtime.getDeviceProperties(
            cupy.cuda.Device().id)["name"].decode()

    def is_device_array(self, x) -> bool:
        return isinstance(x, self.cp.ndarray)

    def upload(self, x: np.ndarray):
        return self.cp.asarray(x)

    def download(self, x) -> np.ndarray:
        return self.cp.asnumpy(x)

    def copy_into(self, host: np.ndarray, dev) -> None:
        dev.get(out=host)

    def empty(self, n: int, dtype):
        return self.cp.empty(max(int(n), 1), dtype)

    def launch(self, kernel: str, grid: int, args: tuple) -> None:
        if grid <= 0:
            return
        fn = self._kernels.get(kernel)
        if fn is None:
            fn = self._kernels[kernel] = self.module.get_function(kernel)
        fn((int(grid),), (BLOCK,), tuple(np.int64(a) if isinstance(a, (int, np.integer)) else a
                                         for a in args))


_runtime = None
_runtime_lock = threading.Lock()


def runtime():
    """The runtime in use: a CupyRuntime, created (and the module compiled) on first use."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            _runtime = CupyRuntime()
        return _runtime


def use_runtime(rt) -> None:
    """Installs another runtime (tests run the kernels on a host emulation this way)."""
    global _runtime
    with _runtime_lock:
        _runtime = rt


def to_device(state: FlatState) -> FlatState:
    """A copy of `state` with param and fields on the device (steps stay on the host)."""
    rt = runtime()
    return FlatState(rt.upload(state.param), {k: rt.upload(v) for k, v in state.fields.items()},
                     state.steps)


def to_host(state: FlatState) -> FlatState:
    rt = runtime()
    return FlatState(rt.download(state.param), {k: rt.download(v) for k, v in state.fields.items()},
                     state.steps)


# ---------------------------------------------------------------------------------------
# Plans: tile and tensor tables per layout and view, built once (host) and uploaded once
# ---------------------------------------------------------------------------------------

@dataclass
class _Plan:
    tiles: np.ndarray            # int64 [n_tiles, TL_COLS]
    tinfo: np.ndarray            # int64 [T, TI_COLS]
    n_row_slots: int
    n_col_slots: int
    n_rows: int                  # AdamP: channel rows of all candidates
    batches: np.ndarray          # int64 [n, 2]: (tensor, batch) of factored tensors
    row_owner: np.ndarray        # int64: tensor of each exp_avg_sq_row entry
    col_owner: np.ndarray
    dev: dict = field(default_factory=dict)   # device copies and scratch, per runtime


def _view(shape, n: int, view: str) -> tuple[int, int, int, bool]:
    """(B, R, C, rows?) of a tensor in `view`; rows? = it has row (and column) sums."""
    if view == "channel" and len(shape) > 1 and n > 0:
        return 1, shape[0], n // shape[0], True
    if view == "factored" and len(shape) >= 2 and n > 0:
        return math.prod(shape[:-2]), shape[-2], shape[-1], True
    return 1, -(-n // TC), TC, False


def _build_plan(layout: FlatLayout, view: str) -> _Plan:
    n_t = layout.num_tensors
    tinfo = np.full((n_t, TI_COLS), -1, np.int64)
    missing = np.full(n_t, -1, np.int64)
    parts = []
    n_tiles = n_row_slots = n_col_slots = n_rows = 0
    batches = []
    for t, shape in enumerate(layout.shapes):     # once per layout, not per step
        n = int(layout.sizes[t])
        b, r, c, has_rows = _view(shape, n, view)
        kr, kc = -(-r // TR), -(-c // TC)
        ti = tinfo[t]
        ti[TI_B], ti[TI_R], ti[TI_C], ti[TI_N], ti[TI_P] = b, r, c, n, layout.offsets[t]
        ti[TI_M] = layout.fields.get("exp_avg", missing)[t]
        ti[TI_NDIM] = len(shape)
        ti[TI_KC], ti[TI_KR] = kc, kr
        ti[TI_TILE0] = n_tiles
        ti[TI_V] = layout.fields.get("exp_avg_sq", missing)[t]
        if view == "factored" and has_rows:
            ti[TI_ROW] = layout.fields["exp_avg_sq_row"][t]
            ti[TI_COL] = layout.fields["exp_avg_sq_col"][t]
            batches.append(np.stack([np.full(b, t), np.arange(b)], axis=1))
        elif has_rows:
            ti[TI_ROW] = n_rows
            n_rows += b * r
        if has_rows:
            ti[TI_RSLOT], ti[TI_CSLOT] = n_row_slots, n_col_slots
            n_row_slots += b * r * kc
            n_col_slots += b * c * kr
        if n == 0:
            ti[TI_NTILES] = 0
            continue
        bb, rr, cc = (a.ravel() for a in np.meshgrid(np.arange(b), np.arange(0, r, TR),
                                                     np.arange(0, c, TC), indexing="ij"))
        tl = np.empty((bb.size, TL_COLS), np.int64)
        tl[:, TL_T], tl[:, TL_B], tl[:, TL_R0], tl[:, TL_C0] = t, bb, rr, cc
        tl[:, TL_NR], tl[:, TL_NC] = np.minimum(TR, r - rr), np.minimum(TC, c - cc)
        parts.append(tl)
        ti[TI_NTILES] = bb.size
        n_tiles += bb.size
    tiles = np.concatenate(parts) if parts else np.zeros((0, TL_COLS), np.int64)

    def owners(name: str) -> np.ndarray:
        total = layout.field_totals.get(name, 0) if view == "factored" else 0
        out = np.full(total, -1, np.int64)
        for t, shape in enumerate(layout.shapes):
            o = int(layout.fields[name][t]) if total else -1
            if o >= 0:
                out[o:o + math.prod(layout.field_shapes[t][name])] = t
        return out

    return _Plan(np.ascontiguousarray(tiles), tinfo, n_row_slots, n_col_slots, n_rows,
                 np.concatenate(batches).astype(np.int64) if batches else np.zeros((0, 2), np.int64),
                 owners("exp_avg_sq_row"), owners("exp_avg_sq_col"))


def _plan(layout: FlatLayout, view: str) -> _Plan:
    return layout.memo(("cuda", view), lambda: _build_plan(layout, view))


def _device_plan(rt, plan: _Plan) -> dict:
    """The plan's tables on the device, and its scratch buffers (allocated once)."""
    if plan.dev.get("rt") is not rt:
        n_tiles, n_t = len(plan.tiles), len(plan.tinfo)
        plan.dev = {
            "rt": rt,
            "tiles": rt.upload(plan.tiles.reshape(-1) if n_tiles else np.zeros(1, np.int64)),
            "tinfo": rt.upload(plan.tinfo.reshape(-1)),
            "batches": rt.upload(plan.batches.reshape(-1) if len(plan.batches) else np.zeros(1, np.int64)),
            "row_owner": rt.upload(plan.row_owner if plan.row_owner.size else np.zeros(1, np.int64)),
            "col_owner": rt.upload(plan.col_owner if plan.col_owner.size else np.zeros(1, np.int64)),
            "tile_stats": rt.empty(n_tiles * 4, np.float64),
            "aux": rt.empty(n_tiles * 2, np.float64),
            "res": rt.empty(n_t * R_COLS, np.float64),
        }
    return plan.dev


def _scratch(rt, dev: dict, key: str, n: int, dtype):
    buf = dev.get(key)
    if buf is None or buf.size < max(n, 1):
        buf = dev[key] = rt.empty(n, dtype)
    return buf


# ---------------------------------------------------------------------------------------
# Per-tensor coefficients (float64, host) and the per-optimizer drivers
# ---------------------------------------------------------------------------------------

def _coefficients(optimizer: str, layout: FlatLayout, h: dict, steps: np.ndarray,
                  active: np.ndarray) -> np.ndarray:
    n_t = layout.num_tensors
    coef = np.zeros((n_t, C_COLS), np.float64)
    coef[:, C_ACTIVE] = active
    if optimizer in ("adamw", "adam", "adamp"):
        b1, b2 = h["beta1"], h["beta2"]
        coef[:, C_SIGN] = 1.0
        coef[:, C_DECAY] = 1.0
        coef[:, C_B1], coef[:, C_C1] = b1, 1.0 - b1
        coef[:, C_B2], coef[:, C_C2] = b2, 1.0 - b2
        coef[:, C_SBC2], coef[:, C_STEP] = coefficients.adam_bias_correction(h, steps)
        coef[:, C_EPS] = h["eps"]
    if optimizer in ("adamw", "adam"):
        coef[:, C_SIGN] = np.where(h["maximize"] != 0, -1.0, 1.0)
        if optimizer == "adam":  # coupled L2: g <- g + lambda*theta
            coef[:, C_L2_ON], coef[:, C_L2] = h["weight_decay"] != 0, h["weight_decay"]
        else:
            coef[:, C_DECAY] = coefficients.decoupled_decay(h, active)
    elif optimizer == "adamp":
        coef[:, C_NESTEROV] = h["nesterov"]
        coef[:, C_CAND] = [len(s) > 1 for s in layout.shapes]
        coef[:, C_DELTA], coef[:, C_LR] = h["delta"], h["lr"]
        coef[:, C_WD], coef[:, C_WD_RATIO] = h["weight_decay"], h["wd_ratio"]
    else:  # adafactor
        beta2t = coefficients.adafactor_beta2t(h, steps)
        coef[:, C_EPS] = h["eps"]
        coef[:, C_B2T], coef[:, C_C2T] = beta2t, 1.0 - beta2t
        coef[:, C_RHO] = coefficients.adafactor_rho(h, steps)
        coef[:, C_SCALE_ON], coef[:, C_EPS2] = h["scale_parameter"] != 0, h["eps2"]
        coef[:, C_CLIP_T] = h["clip_threshold"]
        beta1 = h["adafactor_beta1"]
        b1_on = ~np.isnan(beta1)
        has_m = layout.fields.get("exp_avg", np.full(n_t, -1))[:] >= 0
        if (b1_on & active & ~has_m).any():
            raise ValueError("adafactor beta1 is set for a tensor without an exp_avg buffer")
        coef[:, C_FB1_ON] = b1_on & has_m
        coef[:, C_FB1], coef[:, C_FC1] = np.nan_to_num(beta1), 1.0 - np.nan_to_num(beta1)
        coef[:, C_WD], coef[:, C_WD_ON] = h["weight_decay"], h["weight_decay"] != 0
    return coef


def _grad_kind(grad) -> int:
    dt = grad.dtype
    if dt == np.float32:
        return GK_F32
    if dt == np.float16:
        return GK_F16
    if dt == np.uint16 or dt.name == "bfloat16":
        return GK_BF16
    raise TypeError(f"gradients must be float32, float16 or bfloat16 (uint16 bits), not {dt}")


_lock = threading.Lock()


def _buffers(rt, layout, state, grad):
    """Device arrays for param, grad and each field, and a callback copying results back
    into the host arrays when the state lives on the host."""
    host = not rt.is_device_array(state.param)
    up = (lambda a: rt.upload(np.ascontiguousarray(a))) if host else (lambda a: a)
    param = up(state.param)
    fields = {k: up(v) for k, v in state.fields.items()}
    if grad.dtype.name == "bfloat16":   # ml_dtypes' bfloat16: hand the kernels the bits
        grad = grad.view(np.uint16)
    g = grad if rt.is_device_array(grad) else rt.upload(np.ascontiguousarray(grad))

    def write_back(names):
        if host:
            rt.copy_into(state.param, param)
            for k in names:
                rt.copy_into(state.fields[k], fields[k])
    return param, fields, g, write_back


def _none(rt, dev: dict):
    """A 1-element float32 stand-in for a buffer the job does not have."""
    return _scratch(rt, dev, "none", 1, np.float32)


def step(optimizer: str, layout: FlatLayout, state: FlatState, grad, active: np.ndarray,
         hyper: dict, *, stats: bool = True) -> dict:
    """One step of every active tensor, in place; the contract of reference.step.

    `state` may hold NumPy arrays (uploaded and copied back) or device arrays (stepped in
    place); `grad` may be float32, float16 or bfloat16 bits (uint16), on the host or device.
    Returns per-tensor statistics as NumPy arrays: "projected" (bool, AdamP), "clip"
    (float64, Adafactor's clip divisor) and, only when `stats` is true, in float64,
    "w2" = |w_t|^2, "wdw" = <w_t, dw>, "dw2" = |dw|^2, "g2" = |g|^2 with dw = w_{t+1} - w_t
    (zeros for inactive tensors); with stats=False those keys are absent.
    """
    if optimizer not in ("adamw", "adam", "adamp", "adafactor"):
        raise ValueError(f"unknown optimizer {optimizer!r}")
    n_t = layout.num_tensors
    active = np.asarray(active, bool)
    out = {"projected": np.zeros(n_t, bool), "clip": np.ones(n_t, np.float64)}
    if stats:
        out.update({key: np.zeros(n_t, np.float64) for key in STEP_SUMS})
    if not active.any():
        return out
    gkind = _grad_kind(grad)
    h = {k: np.asarray(v, np.float64) for k, v in hyper.items()}
    # Inactive tensors may have step 0 and arbitrary hyperparameters; their coefficients
    # are computed (vectorised) but never read, so silence the warnings they may raise.
    steps = np.maximum(state.steps, 1).astype(np.float64)
    with np.errstate(all="ignore"):
        coef = _coefficients(optimizer, layout, h, steps, active)
    view = {"adamw": "flat", "adam": "flat", "adamp": "channel", "adafactor": "factored"}[optimizer]
    rt = runtime()
    with _lock:
        plan = _plan(layout, view)
        dev = _device_plan(rt, plan)
        param, fields, g, write_back = _buffers(rt, layout, state, grad)
        dcoef = rt.upload(coef.reshape(-1))
        none = _none(rt, dev)
        n_tiles = len(plan.tiles)
        tiles, tinfo, res, tstats = dev["tiles"], dev["tinfo"], dev["res"], dev["tile_stats"]
        if optimizer in ("adamw", "adam"):
            rt.launch("adam_apply", n_tiles, (tiles, tinfo, dcoef, param, g, gkind,
                                              fields["exp_avg"], fields["exp_avg_sq"], tstats,
                                              int(stats)))
            written = ("exp_avg", "exp_avg_sq")
        elif optimizer == "adamp":
            m, v = fields["exp_avg"], fields["exp_avg_sq"]
            row_part = _scratch(rt, dev, "row_part", plan.n_row_slots * 4, np.float64)
            row_scr = _scratch(rt, dev, "row_scr", plan.n_rows * 2, np.float64)
            pnorm = _scratch(rt, dev, "pnorm", plan.n_rows, np.float32)
            radial = _scratch(rt, dev, "radial", plan.n_rows, np.float32)
            rt.launch("adamp_sums", n_tiles, (tiles, tinfo, dcoef, param, g, gkind, m, v, row_part))
            rt.launch("adamp_decide", n_t, (tinfo, dcoef, row_part, row_scr, pnorm, radial, res))
            rt.launch("adamp_apply", n_tiles, (tiles, tinfo, dcoef, res, pnorm, radial, param, g,
                                               gkind, m, v, tstats, int(stats)))
            written = ("exp_avg", "exp_avg_sq")
        else:
            aux = dev["aux"]
            m = fields.get("exp_avg", none)
            v = fields.get("exp_avg_sq", none)
            rows = fields.get("exp_avg_sq_row", none)
            cols = fields.get("exp_avg_sq_col", none)
            n_rows, n_cols = plan.row_owner.size, plan.col_owner.size
            row_part = _scratch(rt, dev, "row_part", plan.n_row_slots, np.float64)
            col_part = _scratch(rt, dev, "col_part", plan.n_col_slots, np.float64)
            row_factor = _scratch(rt, dev, "row_factor", n_rows, np.float32)
            col_factor = _scratch(rt, dev, "col_factor", n_cols, np.float32)
            rt.launch("adafactor_sums", n_tiles, (tiles, tinfo, dcoef, param, g, gkind, v,
                                                  row_part, col_part, aux))
            rt.launch("adafactor_combine", -(-(n_rows + n_cols) // BLOCK),
                      (tinfo, dcoef, dev["row_owner"], n_rows, dev["col_owner"], n_cols,
                       row_part, col_part, rows, cols, col_factor))
            rt.launch("adafactor_row_factors", -(-len(plan.batches) // WARPS),
                      (dev["batches"], len(plan.batches), tinfo, dcoef, rows, row_factor))
            rt.launch("adafactor_update_sq", n_tiles, (tiles, tinfo, dcoef, g, gkind, row_factor,
                                                       col_factor, aux))
            rt.launch("adafactor_decide", n_t, (tinfo, dcoef, aux, res))
            rt.launch("adafactor_apply", n_tiles, (tiles, tinfo, dcoef, res, param, g, gkind, m, v,
                                                   row_factor, col_factor, tstats, int(stats)))
            written = tuple(k for k in ("exp_avg", "exp_avg_sq", "exp_avg_sq_row", "exp_avg_sq_col")
                            if k in fields)
        if stats:
            rt.launch("segment_sums", n_t, (tinfo, tstats, 4, res, R_W2))
        result = rt.download(res)[:n_t * R_COLS].reshape(n_t, R_COLS)
        write_back(written)
    if stats:
        for key, col in zip(STEP_SUMS, (R_W2, R_WDW, R_DW2, R_G2)):
            out[key] = np.where(active, result[:, col], 0.0)
    if optimizer == "adamp":
        out["projected"] = active & (result[:, R_PROJECTED] != 0)
    elif optimizer == "adafactor":
        out["clip"] = np.where(active, result[:, R_CLIP], 1.0)
    return out
