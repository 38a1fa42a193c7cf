// The block scheduler of the host emulation (see shim.h).
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
    for (long long b = 0; b < grid; ++b) {
        bidx = emu_dim3{(unsigned int)b, 0u, 0u};
        for (int i = 0; i < nthreads; ++i) {
            emu_init_fiber(i);
            fib[i].state = RUN; fib[i].wseq = fib[i].bseq = 0;
        }
        for (;;) {
            for (int i = 0; i < nthreads; ++i)
                if (fib[i].state == RUN) { cur = i; jump(&sched, &fib[i].ctx); }
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
