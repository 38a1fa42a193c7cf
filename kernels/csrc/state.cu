// What a job's state on the GPU does besides the optimizer step (kernels/cuda_state.py):
// check a received gradient for NaN and Inf, average the workers' gradients of a sync step,
// and encode parameters in the wire dtype for the reply. All in the flat view, over the
// tensors whose mask is set.
#include "common.cuh"

// Sum of one double per tile over each tensor's tiles, one block per tensor.
extern "C" __global__ void __launch_bounds__(BLOCK)
tile_totals(const TensorRec* __restrict__ tinfo, const double* __restrict__ per_tile,
            double* __restrict__ out) {
    const TensorRec& ti = tinfo[blockIdx.x];
    double s[4] = {0.0, 0.0, 0.0, 0.0};
    for (i64 i = threadIdx.x; i < ti.ntiles; i += BLOCK) s[0] += per_tile[ti.tile0 + i];
    block_sum4(s);
    if (threadIdx.x == 0) out[blockIdx.x] = s[0];
}

// counts[k] = how many elements of tile k hold a NaN or an Inf (tiles of tensors whose mask
// is 0 count nothing).
extern "C" __global__ void __launch_bounds__(BLOCK)
count_nonfinite(const TileRec* __restrict__ tiles, const TensorRec* __restrict__ tinfo,
                const double* __restrict__ mask, const void* __restrict__ grad, i64 gkind,
                double* __restrict__ counts) {
    const Tile T = load_tile(tiles, tinfo, blockIdx.x);
    double s[4] = {0.0, 0.0, 0.0, 0.0};
    if (mask[T.t] != 0.0) {                               // uniform over the block
        const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
        for (i64 i = warp; i < T.nr; i += WARPS) {
            const i64 rp = tile_row_pos(T, i);
#pragma unroll
            for (int q = 0; q < CPL; ++q) {
                const i64 j = lane + 32 * q, pos = rp + j;
                if (j < T.nc && pos < T.n) {
                    const unsigned int bits = __float_as_uint(load_grad(grad, gkind, T.p + pos));
                    s[0] += (bits & 0x7f800000u) == 0x7f800000u ? 1.0 : 0.0;
                }
            }
        }
    }
    block_sum4(s);
    if (threadIdx.x == 0) counts[T.k] = s[0];
}

// The mean of the workers' gradients of a sync step, for the tensors whose mask is set:
// over the workers that sent each tensor (sent[w * T + t] != 0), summed in rank order in
// float32 from the first sender's value, then divided by their count, as the CPU backend
// does. grads[w] is the device address of worker w's gradient (wire dtype gkind).
extern "C" __global__ void __launch_bounds__(BLOCK)
grad_mean(const TileRec* __restrict__ tiles, const TensorRec* __restrict__ tinfo,
          const double* __restrict__ mask, const unsigned long long* __restrict__ grads,
          i64 workers, const double* __restrict__ sent, i64 n_tensors, i64 gkind,
          float* __restrict__ mean) {
    const Tile T = load_tile(tiles, tinfo, blockIdx.x);
    if (mask[T.t] == 0.0) return;                         // uniform over the block
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (i64 i = warp; i < T.nr; i += WARPS) {
        const i64 rp = tile_row_pos(T, i);
#pragma unroll
        for (int q = 0; q < CPL; ++q) {
            const i64 j = lane + 32 * q, pos = rp + j;
            if (j >= T.nc || pos >= T.n) continue;
            float acc = 0.0f;
            int count = 0;
            for (i64 w = 0; w < workers; ++w) {
                if (sent[w * n_tensors + T.t] == 0.0) continue;
                const float g = load_grad((const void*)grads[w], gkind, T.p + pos);
                acc = count == 0 ? g : acc + g;
                ++count;
            }
            mean[T.p + pos] = acc / (float)count;
        }
    }
}

// float32 -> IEEE half, rounding to nearest even: overflow to infinity, underflow through
// the subnormals to a signed zero, NaN kept a (quiet) NaN.
__device__ __forceinline__ unsigned short float_to_half(unsigned int f) {
    const unsigned int sign = (f >> 16) & 0x8000u, e8 = (f >> 23) & 0xffu, man = f & 0x7fffffu;
    if (e8 == 0xffu) return (unsigned short)(sign | 0x7c00u | (man ? 0x200u | (man >> 13) : 0u));
    const int e = (int)e8 - 127;
    if (e > 15) return (unsigned short)(sign | 0x7c00u);
    unsigned int full = man, shift = 13;             // a normal half keeps 10 of 23 bits
    unsigned int base = (unsigned int)(e + 15) << 10;
    if (e < -14) {                                    // a subnormal half (or zero)
        if (e8 == 0u || e < -25) return (unsigned short)sign;
        full = man | 0x800000u;                       // the implicit bit, now explicit
        shift = (unsigned int)(-e - 1);               // units of 2^-24
        base = 0u;
    }
    unsigned int h = full >> shift;
    const unsigned int rest = full & ((1u << shift) - 1u), half_way = 1u << (shift - 1u);
    if (rest > half_way || (rest == half_way && (h & 1u))) ++h;
    return (unsigned short)(sign | (base + h));       // a carry moves into the exponent
}

// Wire encodings of the reply (okind: GK_F32, GK_BF16 or GK_F16), element for element in
// the flat layout: out holds numel values of the wire dtype.
extern "C" __global__ void __launch_bounds__(BLOCK)
encode_wire(const TileRec* __restrict__ tiles, const TensorRec* __restrict__ tinfo,
            const double* __restrict__ mask, const float* __restrict__ param,
            void* __restrict__ out, i64 okind) {
    const Tile T = load_tile(tiles, tinfo, blockIdx.x);
    if (mask[T.t] == 0.0) return;                         // uniform over the block
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (i64 i = warp; i < T.nr; i += WARPS) {
        const i64 rp = tile_row_pos(T, i);
#pragma unroll
        for (int q = 0; q < CPL; ++q) {
            const i64 j = lane + 32 * q, pos = rp + j;
            if (j >= T.nc || pos >= T.n) continue;
            const i64 e = T.p + pos;
            const unsigned int bits = __float_as_uint(param[e]);
            if (okind == GK_F32) {
                ((unsigned int*)out)[e] = bits;
            } else if (okind == GK_BF16) {   // round to nearest even, in wrapping uint32 (as convert.py)
                ((unsigned short*)out)[e] = (unsigned short)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
            } else {
                ((unsigned short*)out)[e] = float_to_half(bits);
            }
        }
    }
}
