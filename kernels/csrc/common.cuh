// What the kernels of every optimizer share: the tables that map thread blocks to tensors,
// gradient loads, block reductions and the step sums.
//
// Host and device agree on layouts through these files: kernels/cuda_runtime.py reads the
// integer #defines and the structs (of double or i64 fields) to build what it uploads, so
// a field added to a struct is a field the host fills by name.
//
// How the work is cut up. Every tensor is viewed as a batch of matrices (B, R, C):
//   flat      (1, ceil(n/TC), TC), the last row cut at n     elementwise optimizers
//   channel   (1, shape[0], n/shape[0]) if ndim > 1          per output channel (AdamP)
//   factored  (prod(shape[:-2]), shape[-2], shape[-1])       row/column factors (Adafactor)
// and every view is cut into tiles of at most TR rows x TC columns of one matrix. One
// thread block of BLOCK = 256 threads (8 warps) takes one tile: warp w walks rows w, w+8,
// ... and lane l columns l, l+32, l+64, l+96, so each row is read with fully coalesced
// 128-byte warp loads and each thread has 4 independent elements of every buffer in
// flight. The tile table maps blocks to tensors, so each kernel is one launch over all
// tensors however many there are.
//
// Reductions never use atomics, so results do not depend on scheduling: every tile writes
// its float64 partial sums into its own slots, and a second, segmented kernel combines
// them (a tensor's tiles, and a row's strips, are consecutive). Every float32 operation is
// written in the NumPy reference's order, compiled without FMA contraction.
#pragma once

typedef long long i64;

#define BLOCK 256      // threads per block
#define WARPS 8        // BLOCK / 32
#define TR 64          // rows per tile: 8 per warp
#define TC 128         // columns per tile: 4 per lane
#define CPL 4          // TC / 32
static_assert(WARPS * 32 == BLOCK && CPL * 32 == TC, "tile shape");

// Gradient encodings (load_grad).
#define GK_F32 0
#define GK_BF16 1
#define GK_F16 2

// One tile: rows r0 .. r0+nr and columns c0 .. c0+nc of matrix `batch` of a tensor's view.
struct TileRec { i64 tensor, batch, r0, nr, c0, nc; };

// One tensor of a plan. B, R, C: its view; n: numel; p: offset in param/grad; m, v, vm:
// offsets in exp_avg / exp_avg_sq / max_exp_avg_sq (AMSGrad); row, col: where its row / column results start
// (Adafactor: in exp_avg_sq_row / _col; AdamP: in the row scratch arrays); rslot, kc:
// first row partial-sum slot and column strips per row (row r's partials are slots
// rslot + r*kc .. + kc); cslot, kr: likewise for columns and row bands; tile0, ntiles:
// the tensor's tiles. -1 where a tensor has no such buffer or sums.
struct TensorRec { i64 B, R, C, n, p, m, v, vm, row, col, rslot, kc, cslot, kr, tile0, ntiles, ndim; };

// Per tensor, for the metrics: sum w^2, sum w*dw, sum dw^2, sum g^2 (w = old theta,
// dw = new theta - old theta), in float64.
struct StepSums { double w2, wdw, dw2, g2; };

// A tile with its tensor's view, as the kernels use it; pos(i, j) = tile_row_pos(i) + j is
// the tensor-relative flat index of tile element (row i, column j), valid when j < nc and
// pos < n (the flat view's last row is cut at n).
struct Tile { i64 k, t, b, r0, nr, c0, nc, R, C, n, p; };

__device__ __forceinline__ Tile load_tile(const TileRec* __restrict__ tiles,
                                          const TensorRec* __restrict__ tinfo, i64 k) {
    const TileRec tl = tiles[k];
    const TensorRec& ti = tinfo[tl.tensor];
    Tile T;
    T.k = k;
    T.t = tl.tensor; T.b = tl.batch; T.r0 = tl.r0; T.nr = tl.nr; T.c0 = tl.c0; T.nc = tl.nc;
    T.R = ti.R; T.C = ti.C; T.n = ti.n; T.p = ti.p;
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

// Adds one element to the step sums, in float64: w = old theta, dw = new - old.
__device__ __forceinline__ void step_terms(double* s, float old, float nw, float g) {
    const double w = (double)old, dw = (double)nw - w, gd = (double)g;
    s[0] += w * w;
    s[1] += w * dw;
    s[2] += dw * dw;
    s[3] += gd * gd;
}

// The end of every kernel that writes theta: the tile's step sums into tile_sums[k]. Every
// thread of the block calls it; with_sums is uniform over the grid (0: nothing is summed).
__device__ __forceinline__ void store_tile_sums(double* s, StepSums* __restrict__ tile_sums,
                                                i64 k, i64 with_sums) {
    if (!with_sums) return;
    block_sum4(s);
    if (threadIdx.x == 0) tile_sums[k] = StepSums{s[0], s[1], s[2], s[3]};
}

// Per-tensor step sums from the per-tile ones, one block per tensor.
extern "C" __global__ void __launch_bounds__(BLOCK)
segment_sums(const TensorRec* __restrict__ tinfo, const StepSums* __restrict__ tile_sums,
             StepSums* __restrict__ sums) {
    const TensorRec& ti = tinfo[blockIdx.x];
    double s[4] = {0.0, 0.0, 0.0, 0.0};
    for (i64 i = threadIdx.x; i < ti.ntiles; i += BLOCK) {
        const StepSums& x = tile_sums[ti.tile0 + i];
        s[0] += x.w2;
        s[1] += x.wdw;
        s[2] += x.dw2;
        s[3] += x.g2;
    }
    block_sum4(s);
    if (threadIdx.x == 0) sums[blockIdx.x] = StepSums{s[0], s[1], s[2], s[3]};
}
