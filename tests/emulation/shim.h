// A host emulation of the CUDA thread model, enough to run optserve's kernels on a CPU
// (tests/emulator.py). Each GPU thread is a fiber; __syncthreads and warp shuffles are
// barriers the scheduler (runner.cpp) releases once every thread of the block, or lane of
// the warp, has arrived; blocks run one after another. Between barriers the threads of a
// block run in a shuffled order, and __shared__ memory (one section, emu_shared) is
// poisoned before each block, so that a thread reading what another has not yet written,
// or what an earlier block left, reads garbage. Compiled as:
//   shim.h, the kernel source (kernels/cuda_runtime.assemble), runner.cpp, wrappers.
#include <math.h>
#include <string.h>
#include <stdio.h>
#include <stdlib.h>
#include <stdint.h>
#include <ucontext.h>

struct emu_dim3 { unsigned int x, y, z; };

// Context switches: on x86-64 a few instructions (callee-saved registers and the stack
// pointer; no signal mask, unlike swapcontext, which makes a system call per switch).
#if defined(__x86_64__)
extern "C" void emu_switch(void** save_sp, void* load_sp);
asm(R"(
.text
.globl emu_switch
.type emu_switch,@function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
.size emu_switch, .-emu_switch
)");
struct emu_ctx { void* sp; };
#else
struct emu_ctx { ucontext_t uc; };
#endif

namespace emu {
enum { RUN, WAIT_WARP, WAIT_BLOCK, DONE };
const int MAXT = 1024;
const size_t STACK = 128 * 1024;
struct Fiber { emu_ctx ctx; int state; long long wseq, bseq; };
static Fiber fib[MAXT];
static char* stacks[MAXT];
static emu_ctx sched;
static int cur, nthreads;
static emu_dim3 bidx, bdim, gdim;
static unsigned long long xbuf[2][MAXT];
static void (*entry_fn)(const long long*);
static const long long* entry_args;

static inline void jump(emu_ctx* from, emu_ctx* to) {
#if defined(__x86_64__)
    emu_switch(&from->sp, to->sp);
#else
    swapcontext(&from->uc, &to->uc);
#endif
}

static inline void block_here(int state) {
    Fiber& f = fib[cur];
    f.state = state;
    jump(&f.ctx, &sched);
}
}  // namespace emu

#define threadIdx (emu_dim3{(unsigned int)emu::cur, 0u, 0u})
#define blockIdx (emu::bidx)
#define blockDim (emu::bdim)
#define gridDim (emu::gdim)
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static __attribute__((section("emu_shared")))

static inline void __syncthreads() { emu::fib[emu::cur].bseq++; emu::block_here(emu::WAIT_BLOCK); }

static inline float __uint_as_float(unsigned int u) { float f; memcpy(&f, &u, 4); return f; }
static inline unsigned int __float_as_uint(float f) { unsigned int u; memcpy(&u, &f, 4); return u; }

// Every lane of the warp must arrive (the scheduler checks); the value exchange is
// double-buffered by sequence number, so a lane that runs ahead cannot overwrite a slot
// another lane has yet to read.
template <class T> static inline T __shfl_xor_sync(unsigned int, T v, int lanemask) {
    const int me = emu::cur;
    emu::Fiber& f = emu::fib[me];
    const int slot = (int)(f.wseq & 1);
    unsigned long long bits = 0;
    memcpy(&bits, &v, sizeof(T));
    emu::xbuf[slot][me] = bits;
    f.wseq++;
    emu::block_here(emu::WAIT_WARP);
    const int src = (me & ~31) | ((me & 31) ^ lanemask);
    T out;
    memcpy(&out, &emu::xbuf[slot][src], sizeof(T));
    return out;
}
