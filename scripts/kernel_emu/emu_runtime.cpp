// The scheduler of the CUDA emulator (see emu.h): blocks one after another, a block's threads
// as fibers switched at barriers; device buffers between guard pages.
//
// A fiber starts with setcontext and is switched with _setjmp/_longjmp afterwards: unlike
// swapcontext they do not save the signal mask, a system call per switch that made the
// switches most of the emulator's time. Jumps between stacks are what fortified longjmp
// rejects, hence the #undef.
#undef _FORTIFY_SOURCE
#include <setjmp.h>
#include <signal.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "emu.h"

dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace {

enum class St { Ready, Block, Warp, Done };

struct Fiber {
    ucontext_t ctx;  // the entry, for the first switch
    jmp_buf jb;      // where it yielded, for the later ones
    bool started;
    dim3 tid;
    St st;
    unsigned mask;
};

const size_t kStack = 256 * 1024;
std::vector<Fiber> fibers;
std::vector<char*> stacks;
std::vector<uint64_t> slots;
jmp_buf sched;
int cur = -1;
void (*body)(void**) = nullptr;
void** body_args = nullptr;
const char* kernel = "";
std::string error;

struct Alloc {
    char* p;
    size_t n;
};
std::vector<Alloc> allocs;

void entry() {
    body(body_args);
    fibers[cur].st = St::Done;
    _longjmp(sched, 1);
}

void yield_to_scheduler() {
    if (!_setjmp(fibers[cur].jb)) _longjmp(sched, 1);
}

// Runs fiber i until it yields or ends.
void resume(int i) {
    if (_setjmp(sched)) return;
    if (!fibers[i].started) {
        fibers[i].started = true;
        setcontext(&fibers[i].ctx);
    }
    _longjmp(fibers[i].jb, 1);
}

void on_fault(int sig, siginfo_t* info, void*) {
    char msg[512];
    const char* addr = (const char*)info->si_addr;
    std::string where = "no buffer nearby";
    for (size_t i = 0; i < allocs.size(); i++) {
        const Alloc& a = allocs[i];
        if (addr >= a.p + a.n && addr < a.p + a.n + 8192) {
            where = "element byte " + std::to_string(addr - a.p) + " of buffer #" +
                    std::to_string(i) + " of " + std::to_string(a.n) + " bytes (past its end)";
        } else if (addr < a.p && addr + 8192 >= a.p) {
            where = std::to_string(a.p - addr) + " bytes before buffer #" + std::to_string(i);
        }
    }
    int n = snprintf(msg, sizeof msg,
                     "emu: signal %d in kernel %s, block (%u,%u,%u), thread (%u,%u,%u): address "
                     "%p, %s\n",
                     sig, kernel, blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y,
                     threadIdx.z, info->si_addr, where.c_str());
    if (n > 0) (void)!write(2, msg, (size_t)n);
    _exit(86);
}

void install_fault_handler() {
    static bool done = false;
    if (done) return;
    done = true;
    static char alt[1 << 16];
    stack_t ss{};
    ss.ss_sp = alt;
    ss.ss_size = sizeof alt;
    sigaltstack(&ss, nullptr);
    struct sigaction sa{};
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigaction(SIGSEGV, &sa, nullptr);
    sigaction(SIGBUS, &sa, nullptr);
    sigaction(SIGFPE, &sa, nullptr);
}

// Lanes of fiber i's warp that its warp barrier waits for; false (with `error`) on a lane that
// exited or waits at another barrier (a deadlock on real hardware, or undefined behaviour).
bool warp_ready(int i, int n, bool* bad) {
    unsigned m = fibers[i].mask;
    int base = i & ~31;
    for (int j = 0; j < 32; j++) {
        if (!(m >> j & 1u) || base + j >= n) continue;
        const Fiber& f = fibers[base + j];
        if (f.st == St::Done) {
            *bad = true;
            error = "thread " + std::to_string(i) + " waits in a warp collective (mask " +
                    std::to_string(m) + ") for lane " + std::to_string(j) + ", which exited";
            return false;
        }
        if (f.st != St::Warp || f.mask != m) return false;
    }
    return true;
}

// Runs the current block to the end; false (with `error`) on a deadlock.
bool run_block(int n, bool reverse) {
    for (int i = 0; i < n; i++) {
        Fiber& f = fibers[i];
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = stacks[i];
        f.ctx.uc_stack.ss_size = kStack;
        f.ctx.uc_link = nullptr;
        makecontext(&f.ctx, entry, 0);
        f.st = St::Ready;
        f.started = false;
        f.tid = {(unsigned)i % blockDim.x, (unsigned)i / blockDim.x % blockDim.y,
                 (unsigned)i / (blockDim.x * blockDim.y)};
    }
    for (;;) {
        for (int k = 0; k < n; k++) {
            int i = reverse ? n - 1 - k : k;
            if (fibers[i].st != St::Ready) continue;
            cur = i;
            threadIdx = fibers[i].tid;
            resume(i);
        }
        bool released = false, bad = false;
        for (int i = 0; i < n; i++) {
            if (fibers[i].st != St::Warp || !warp_ready(i, n, &bad)) {
                if (bad) return false;
                continue;
            }
            unsigned m = fibers[i].mask;
            int base = i & ~31;
            for (int j = 0; j < 32 && base + j < n; j++)
                if (m >> j & 1u) fibers[base + j].st = St::Ready;
            released = true;
        }
        if (released) continue;
        int waiting = 0, done = 0;
        for (int i = 0; i < n; i++) {
            waiting += fibers[i].st == St::Block;
            done += fibers[i].st == St::Done;
        }
        if (done == n) return true;
        if (waiting + done == n) {
            for (int i = 0; i < n; i++)
                if (fibers[i].st == St::Block) fibers[i].st = St::Ready;
            continue;
        }
        error = "deadlock: " + std::to_string(waiting) + " threads wait at __syncthreads, " +
                std::to_string(n - waiting - done) + " in warp collectives, " +
                std::to_string(done) + " exited";
        return false;
    }
}

}  // namespace

void emu_syncthreads_() {
    fibers[cur].st = St::Block;
    yield_to_scheduler();
}

void emu_warp_barrier_(unsigned mask) {
    fibers[cur].st = St::Warp;
    fibers[cur].mask = mask;
    yield_to_scheduler();
}

unsigned emu_lane() { return (unsigned)cur & 31u; }
unsigned emu_linear_tid() { return (unsigned)cur; }
uint64_t* emu_slots() { return slots.data(); }

extern "C" const char* emu_error() { return error.c_str(); }

// A device buffer of `n` bytes ending (16-byte aligned) at a guard page, with one before it.
extern "C" void* emu_alloc(size_t n) {
    install_fault_handler();
    const size_t pg = 4096, body = (n + 16 + pg - 1) / pg * pg;
    char* base = (char*)mmap(nullptr, body + 2 * pg, PROT_READ | PROT_WRITE,
                             MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) return nullptr;
    mprotect(base, pg, PROT_NONE);
    mprotect(base + pg + body, pg, PROT_NONE);
    char* p = base + pg + body - (n + 15) / 16 * 16;
    allocs.push_back({p, n});
    return p;
}

// Runs `fn(args)` over the grid; returns 0, or -1 with emu_error() saying why.
int emu_run(const char* name, void (*fn)(void**), void** args, unsigned gx, unsigned gy,
            unsigned gz, unsigned bx, unsigned by, unsigned bz, int reverse) {
    install_fault_handler();
    int n = (int)(bx * by * bz);
    if (n <= 0 || n > 1024) {
        error = "block of " + std::to_string(n) + " threads (1..1024 allowed)";
        return -1;
    }
    while ((int)stacks.size() < n) stacks.push_back((char*)malloc(kStack));
    fibers.assign(n, Fiber{});
    slots.assign(n, 0);
    body = fn;
    body_args = args;
    kernel = name;
    blockDim = {bx, by, bz};
    gridDim = {gx, gy, gz};
    // Reversed, the blocks run last to first too: a result that depends on the order of
    // blocks (two blocks writing one place) then differs between the two runs.
    const unsigned nb = gx * gy * gz;
    for (unsigned b = 0; b < nb; b++) {
        const unsigned i = reverse ? nb - 1 - b : b;
        const unsigned x = i % gx, y = i / gx % gy, z = i / (gx * gy);
        blockIdx = {x, y, z};
        if (!run_block(n, reverse != 0)) {
            error = std::string(name) + ", block (" + std::to_string(x) + "," +
                    std::to_string(y) + "," + std::to_string(z) + "): " + error;
            return -1;
        }
    }
    return 0;
}

// A buffer allocated elsewhere (scripts/fake_cuda), named in fault messages like emu_alloc's.
extern "C" void emu_register(void* p, size_t n) {
    install_fault_handler();
    allocs.push_back({(char*)p, n});
}

extern "C" void emu_unregister(void* p, size_t) {
    for (size_t i = 0; i < allocs.size(); i++)
        if (allocs[i].p == (char*)p) {
            allocs.erase(allocs.begin() + (long)i);
            return;
        }
}
