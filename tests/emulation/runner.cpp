// The block scheduler of the host emulation (see shim.h).

// Every __shared__ variable lives in the section emu_shared (shim.h); the linker marks its
// ends. The anchor keeps the section, and so the symbols, there for any kernel source.
static char emu_shared_anchor __attribute__((section("emu_shared"), used));
extern "C" char __start_emu_shared[], __stop_emu_shared[];

// The order a block's threads run in between two barriers: a fresh shuffle each time
// (xorshift, seeded by the block and the launch's number in the process, so that a run
// reproduces; OPTSERVE_EMU_SEED, a number, gives other orders).
static unsigned long long emu_rng;
static int emu_order[emu::MAXT];

static void emu_shuffle(int n) {
    for (int i = 0; i < n; ++i) emu_order[i] = i;
    for (int i = n - 1; i > 0; --i) {
        emu_rng ^= emu_rng << 13; emu_rng ^= emu_rng >> 7; emu_rng ^= emu_rng << 17;
        const int j = (int)(emu_rng % (unsigned long long)(i + 1));
        const int t = emu_order[i]; emu_order[i] = emu_order[j]; emu_order[j] = t;
    }
}

static void emu_trampoline() {
    emu::entry_fn(emu::entry_args);
    emu::fib[emu::cur].state = emu::DONE;
    emu::jump(&emu::fib[emu::cur].ctx, &emu::sched);   // never resumed
    abort();
}

// A fresh fiber that starts in emu_trampoline on its own stack.
static void emu_init_fiber(int i) {
    using namespace emu;
#if defined(__x86_64__)
    // Top of stack: [fake return address][emu_trampoline][6 callee-saved registers]; the
    // first emu_switch pops the registers and "returns" into emu_trampoline with the stack
    // aligned as after a call.
    uintptr_t top = ((uintptr_t)(stacks[i] + STACK)) & ~(uintptr_t)15;
    void** sp = (void**)top;
    *--sp = 0;
    *--sp = (void*)emu_trampoline;
    for (int r = 0; r < 6; ++r) *--sp = 0;
    fib[i].ctx.sp = sp;
#else
    getcontext(&fib[i].ctx.uc);
    fib[i].ctx.uc.uc_stack.ss_sp = stacks[i];
    fib[i].ctx.uc.uc_stack.ss_size = STACK;
    fib[i].ctx.uc.uc_link = 0;
    makecontext(&fib[i].ctx.uc, emu_trampoline, 0);
#endif
}

// Runs grid blocks of `block` threads, one block after another. Returns 0, or 1 with a
// message in err (divergent barrier or shuffle, deadlock).
extern "C" int emu_launch(void (*fn)(const long long*), const long long* args, long long grid,
                          long long block, char* err, int errlen) {
    using namespace emu;
    if (block <= 0 || block > MAXT || block % 32) {
        snprintf(err, errlen, "bad block size %lld", block);
        return 1;
    }
    entry_fn = fn; entry_args = args; nthreads = (int)block;
    gdim = emu_dim3{(unsigned int)grid, 1u, 1u};
    bdim = emu_dim3{(unsigned int)block, 1u, 1u};
    for (int i = 0; i < nthreads; ++i)
        if (!stacks[i]) stacks[i] = (char*)malloc(STACK);
    static unsigned long long launches = 0;
    if (launches++ == 0 && getenv("OPTSERVE_EMU_SEED"))
        launches = 1 + 1000000007ull * strtoull(getenv("OPTSERVE_EMU_SEED"), 0, 10);
    for (long long b = 0; b < grid; ++b) {
        bidx = emu_dim3{(unsigned int)b, 0u, 0u};
        emu_rng = 0x9E3779B97F4A7C15ull * (launches * 1000003ull + (unsigned long long)b + 1);
        memset(__start_emu_shared, 0xFF, (size_t)(__stop_emu_shared - __start_emu_shared));
        for (int i = 0; i < nthreads; ++i) {
            emu_init_fiber(i);
            fib[i].state = RUN; fib[i].wseq = fib[i].bseq = 0;
        }
        for (;;) {
            emu_shuffle(nthreads);
            for (int k = 0; k < nthreads; ++k) {
                const int i = emu_order[k];
                if (fib[i].state == RUN) { cur = i; jump(&sched, &fib[i].ctx); }
            }
            int done = 0, at_block = 0;
            for (int i = 0; i < nthreads; ++i) {
                done += fib[i].state == DONE;
                at_block += fib[i].state == WAIT_BLOCK;
            }
            if (done == nthreads) break;
            bool released = false;
            for (int w = 0; w < nthreads / 32; ++w) {
                int waiting = 0;
                for (int l = 0; l < 32; ++l) waiting += fib[w * 32 + l].state == WAIT_WARP;
                if (waiting == 0) continue;
                if (waiting == 32) {
                    for (int l = 1; l < 32; ++l)
                        if (fib[w * 32 + l].wseq != fib[w * 32].wseq) {
                            snprintf(err, errlen, "block %lld warp %d: lanes at different shuffles", b, w);
                            return 1;
                        }
                    for (int l = 0; l < 32; ++l) fib[w * 32 + l].state = RUN;
                    released = true;
                }
            }
            if (released) continue;
            if (at_block == nthreads) {
                for (int i = 1; i < nthreads; ++i)
                    if (fib[i].bseq != fib[0].bseq) {
                        snprintf(err, errlen, "block %lld: threads at different __syncthreads", b);
                        return 1;
                    }
                for (int i = 0; i < nthreads; ++i) fib[i].state = RUN;
                continue;
            }
            snprintf(err, errlen, "block %lld: deadlock or divergent barrier (%d done, %d at "
                     "__syncthreads, the rest at a warp shuffle with lanes missing)", b, done, at_block);
            return 1;
        }
    }
    return 0;
}
