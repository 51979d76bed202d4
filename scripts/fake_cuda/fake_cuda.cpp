// A CUDA driver and cuBLASLt on the CPU, for running arbor's GPU backend where no GPU is
// (scripts/fake_cuda/README.md). Built as libcuda.so.1 (also named libcublasLt.so), it
// exports the part of the driver API and of cuBLASLt that cudarc calls for arbor; everything
// else is absent, so cudarc names any new call it needs ("Missing symbol ...").
//
// - Device memory is host memory between guard pages: a kernel or a copy past a buffer's end
//   stops the process with the buffer named (the emulator's fault handler).
// - Kernels run on the emulator (scripts/kernel_emu): each kernels/*.cu compiled as C++ into
//   a library listed in $ARBOR_FAKE_CUDA_KERNELS; a launch calls it by the kernel's name.
//   The module's PTX (from the real NVRTC) must declare the entry, as on a GPU.
// - Work runs at once, in issue order, except on a stream being captured: there it is
//   recorded (kernel arguments copied, as CUDA does) and runs at each launch of the graph.
//   Synchronous calls during a capture fail and invalidate it, as on a GPU.
// - cuBLASLt: the column-major matmul D = α·op(A)·op(B) + β·C for the types arbor uses
//   (bf16 or f32 A/B, f32 C/D, f32 compute), accumulated in double.
// One lock serialises every call: the emulator is single-threaded.
#include <dlfcn.h>
#include <sys/mman.h>
#include <time.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <set>
#include <string>
#include <vector>

typedef int CUresult;
typedef unsigned long long CUdeviceptr;
enum : int {
    OK = 0,
    E_INVALID_VALUE = 1,
    E_OUT_OF_MEMORY = 2,
    E_NO_DEVICE = 100,
    E_INVALID_DEVICE = 101,
    E_INVALID_IMAGE = 200,
    E_INVALID_HANDLE = 400,
    E_NOT_FOUND = 500,
    E_LAUNCH_FAILED = 719,
    E_NOT_SUPPORTED = 801,
    E_CAPTURE_UNSUPPORTED = 900,
    E_CAPTURE_INVALIDATED = 901,
};

namespace {

std::recursive_mutex mu;
#define LOCK std::lock_guard<std::recursive_mutex> lock_(mu)

// ---- kernels on the emulator ----------------------------------------------------------------

typedef int (*LaunchFn)(const char*, void**, unsigned, unsigned, unsigned, unsigned, unsigned,
                        unsigned, int);
typedef const int* (*SizesFn)(const char*);
typedef const char* (*ErrorFn)();
typedef void (*RegisterFn)(void*, size_t);

struct EmuLib {
    LaunchFn launch;
    SizesFn sizes;
    ErrorFn error;
    RegisterFn reg, unreg;
};
std::vector<EmuLib> libs;
bool libs_loaded = false;
std::string load_error;

void load_libs() {
    if (libs_loaded) return;
    libs_loaded = true;
    const char* list = getenv("ARBOR_FAKE_CUDA_KERNELS");
    if (!list || !*list) {
        load_error = "ARBOR_FAKE_CUDA_KERNELS is not set (scripts/fake_cuda/build.py prints it)";
        return;
    }
    std::string s(list);
    size_t at = 0;
    while (at <= s.size()) {
        size_t end = s.find(':', at);
        if (end == std::string::npos) end = s.size();
        std::string path = s.substr(at, end - at);
        at = end + 1;
        if (path.empty()) continue;
        void* h = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
        if (!h) {
            load_error = std::string("cannot load ") + path + ": " + dlerror();
            return;
        }
        EmuLib l{(LaunchFn)dlsym(h, "emu_launch"), (SizesFn)dlsym(h, "emu_arg_sizes"),
                 (ErrorFn)dlsym(h, "emu_error"), (RegisterFn)dlsym(h, "emu_register"),
                 (RegisterFn)dlsym(h, "emu_unregister")};
        if (!l.launch || !l.sizes || !l.error || !l.reg || !l.unreg) {
            load_error = path + " is not an emulator library of scripts/kernel_emu";
            return;
        }
        libs.push_back(l);
    }
}

struct Module {
    std::set<std::string> entries;  // from the PTX; empty = not PTX, no check
};
struct Func {
    std::string name;
    const EmuLib* lib;
    std::vector<int> sizes;
};

// ---- memory ---------------------------------------------------------------------------------

struct Block {
    char* base;
    size_t total;
    size_t n;
};
std::map<uintptr_t, Block> blocks;  // by user pointer
size_t used_bytes = 0;

size_t total_bytes() {
    const char* mb = getenv("ARBOR_FAKE_CUDA_MEM_MB");
    return (size_t)(mb ? atoll(mb) : 4096) << 20;
}

CUresult alloc(CUdeviceptr* out, size_t n) {
    if (!out) return E_INVALID_VALUE;
    load_libs();
    if (n == 0) n = 1;
    if (used_bytes + n > total_bytes()) return E_OUT_OF_MEMORY;
    const size_t pg = 4096, body = (n + 15 + pg - 1) / pg * pg;
    char* base = (char*)mmap(nullptr, body + 2 * pg, PROT_READ | PROT_WRITE,
                             MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) return E_OUT_OF_MEMORY;
    mprotect(base, pg, PROT_NONE);
    mprotect(base + pg + body, pg, PROT_NONE);
    // 16-byte aligned (cudaMalloc gives 256), ending as close to the guard page as that
    // allows, so that a read a few elements past the end faults.
    char* p = base + pg + (body - n) / 16 * 16;
    // Fresh device memory is not zero on a GPU: fill it, so that code relying on zeros fails.
    memset(p, 0xA5, n);
    blocks[(uintptr_t)p] = {base, body + 2 * pg, n};
    used_bytes += n;
    for (auto& l : libs) l.reg(p, n);
    *out = (CUdeviceptr)p;
    return OK;
}

CUresult release(CUdeviceptr d) {
    if (!d) return OK;
    auto it = blocks.find((uintptr_t)d);
    if (it == blocks.end()) return E_INVALID_VALUE;
    for (auto& l : libs) l.unreg((void*)d, it->second.n);
    used_bytes -= it->second.n;
    munmap(it->second.base, it->second.total);
    blocks.erase(it);
    return OK;
}

// The buffer holding [p, p + n), or false: a copy that is not inside one buffer is a bug.
bool inside(CUdeviceptr p, size_t n) {
    auto it = blocks.upper_bound((uintptr_t)p);
    if (it == blocks.begin()) return false;
    --it;
    return (uintptr_t)p >= it->first && (uintptr_t)p + n <= it->first + it->second.n;
}

// ---- streams, capture, graphs ---------------------------------------------------------------

typedef std::function<CUresult()> Op;
struct Stream {
    int capture = 0;  // 0 none, 1 active, 2 invalidated
    std::vector<Op> ops;
};
Stream null_stream;
std::set<Stream*> streams;
struct Graph {
    std::vector<Op> ops;
};
CUresult sticky = OK;  // a failed kernel poisons the context, as on a GPU

Stream* st(void* s) { return s ? (Stream*)s : &null_stream; }

// Runs `op` now, or records it when `s` is capturing.
CUresult submit(void* s, Op op) {
    if (sticky) return sticky;
    Stream* t = st(s);
    if (t->capture == 1) {
        t->ops.push_back(std::move(op));
        return OK;
    }
    if (t->capture == 2) return E_CAPTURE_INVALIDATED;
    CUresult r = op();
    if (r == E_LAUNCH_FAILED) sticky = r;
    return r;
}

// A synchronous call on `s` (or on any stream, for s == null): illegal while capturing.
CUresult sync_point(void* s) {
    if (sticky) return sticky;
    for (Stream* t : streams)
        if (t->capture && (s == nullptr || t == s)) {
            t->capture = 2;
            return E_CAPTURE_UNSUPPORTED;
        }
    return OK;
}

double now_ms() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

int fake_ctx_storage, fake_dev_ctx;
void* current_ctx = nullptr;

}  // namespace

#define API extern "C" __attribute__((visibility("default")))

// ---- driver: init, devices, contexts --------------------------------------------------------

API CUresult cuInit(unsigned) { return OK; }
API CUresult cuDriverGetVersion(int* v) {
    *v = 13000;
    return OK;
}
// NVRTC opens the driver and asks for this private interface; refusing it makes NVRTC carry on
// as on a machine without a driver (a missing symbol makes it crash).
API CUresult cuGetExportTable(const void** table, const void*) {
    *table = nullptr;
    return E_NOT_SUPPORTED;
}
API CUresult cuDeviceGetCount(int* n) {
    *n = 1;
    return OK;
}
API CUresult cuDeviceGet(int* dev, int ordinal) {
    if (ordinal != 0) return E_INVALID_DEVICE;
    *dev = 0;
    return OK;
}
API CUresult cuDeviceGetName(char* name, int len, int) {
    snprintf(name, (size_t)len, "arbor fake CUDA device (CPU emulator, sm_90)");
    return OK;
}
API CUresult cuDeviceTotalMem_v2(size_t* bytes, int) {
    *bytes = total_bytes();
    return OK;
}
API CUresult cuDeviceGetAttribute(int* v, int attr, int) {
    switch (attr) {
        case 1: *v = 1024; break;                  // max threads per block
        case 2: case 3: *v = 1024; break;          // block dims x, y
        case 4: *v = 64; break;                    // block dim z
        case 5: *v = 2147483647; break;            // grid x
        case 6: case 7: *v = 65535; break;         // grid y, z
        case 8: *v = 49152; break;                 // shared memory per block
        case 10: *v = 32; break;                   // warp size
        case 12: *v = 65536; break;                // registers per block
        case 13: *v = 1980000; break;              // clock kHz
        case 16: *v = 132; break;                  // SMs
        case 36: *v = 2619000; break;              // memory clock kHz
        case 37: *v = 5120; break;                 // bus width
        case 38: *v = 50 << 20; break;             // L2
        case 39: *v = 2048; break;                 // threads per SM
        case 41: *v = 1; break;                    // unified addressing
        case 75: *v = 9; break;                    // compute capability
        case 76: *v = 0; break;
        case 81: *v = 233472; break;               // shared memory per SM
        case 97: *v = 232448; break;               // shared memory per block, opt-in
        case 115: *v = 1; break;                   // memory pools
        default: *v = 0;
    }
    return OK;
}
API CUresult cuDevicePrimaryCtxRetain(void** ctx, int) {
    *ctx = &fake_dev_ctx;
    return OK;
}
API CUresult cuDevicePrimaryCtxRelease_v2(int) { return OK; }
API CUresult cuCtxSetCurrent(void* ctx) {
    current_ctx = ctx;
    return OK;
}
API CUresult cuCtxGetCurrent(void** ctx) {
    *ctx = current_ctx;
    return OK;
}
API CUresult cuCtxSynchronize() {
    LOCK;
    return sync_point(nullptr);
}
API CUresult cuCtxGetStreamPriorityRange(int* lo, int* hi) {
    if (lo) *lo = 0;
    if (hi) *hi = -5;
    return OK;
}
API CUresult cuGetErrorName(CUresult e, const char** s) {
    static std::map<int, std::string> names;
    auto& n = names[e];
    if (n.empty()) n = "CUDA_ERROR_" + std::to_string(e) + " (fake CUDA)";
    *s = n.c_str();
    return OK;
}
API CUresult cuGetErrorString(CUresult e, const char** s) { return cuGetErrorName(e, s); }

// ---- memory ---------------------------------------------------------------------------------

API CUresult cuMemGetInfo_v2(size_t* free_b, size_t* total) {
    LOCK;
    *total = total_bytes();
    *free_b = *total - used_bytes;
    return OK;
}
API CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t n) {
    LOCK;
    return alloc(p, n);
}
API CUresult cuMemAllocAsync(CUdeviceptr* p, size_t n, void* s) {
    LOCK;
    if (st(s)->capture) return sync_point(s);  // arbor never allocates inside a capture
    return alloc(p, n);
}
API CUresult cuMemFree_v2(CUdeviceptr p) {
    LOCK;
    return release(p);
}
API CUresult cuMemFreeAsync(CUdeviceptr p, void* s) {
    LOCK;
    if (st(s)->capture) return sync_point(s);
    return release(p);
}

static CUresult copy(void* dst, const void* src, size_t n) {
    memmove(dst, src, n);
    return OK;
}
API CUresult cuMemcpyHtoD_v2(CUdeviceptr d, const void* h, size_t n) {
    LOCK;
    if (CUresult r = sync_point(nullptr)) return r;
    if (!inside(d, n)) return E_INVALID_VALUE;
    return copy((void*)d, h, n);
}
API CUresult cuMemcpyDtoH_v2(void* h, CUdeviceptr d, size_t n) {
    LOCK;
    if (CUresult r = sync_point(nullptr)) return r;
    if (!inside(d, n)) return E_INVALID_VALUE;
    return copy(h, (void*)d, n);
}
API CUresult cuMemcpyDtoD_v2(CUdeviceptr d, CUdeviceptr s, size_t n) {
    LOCK;
    if (CUresult r = sync_point(nullptr)) return r;
    if (!inside(d, n) || !inside(s, n)) return E_INVALID_VALUE;
    return copy((void*)d, (void*)s, n);
}
API CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr d, const void* h, size_t n, void* s) {
    LOCK;
    if (!inside(d, n)) return E_INVALID_VALUE;
    // Pageable host memory: a GPU copies it before the call returns; a capture cannot hold it.
    if (st(s)->capture) return sync_point(s);
    return submit(s, [=] { return copy((void*)d, h, n); });
}
API CUresult cuMemcpyDtoHAsync_v2(void* h, CUdeviceptr d, size_t n, void* s) {
    LOCK;
    if (!inside(d, n)) return E_INVALID_VALUE;
    if (st(s)->capture) return sync_point(s);
    return submit(s, [=] { return copy(h, (void*)d, n); });
}
API CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr d, CUdeviceptr src, size_t n, void* s) {
    LOCK;
    if (!inside(d, n) || !inside(src, n)) return E_INVALID_VALUE;
    return submit(s, [=] { return copy((void*)d, (void*)src, n); });
}
API CUresult cuMemsetD8Async(CUdeviceptr d, unsigned char v, size_t n, void* s) {
    LOCK;
    if (!inside(d, n)) return E_INVALID_VALUE;
    return submit(s, [=] {
        memset((void*)d, v, n);
        return OK;
    });
}
API CUresult cuMemsetD8_v2(CUdeviceptr d, unsigned char v, size_t n) {
    LOCK;
    if (CUresult r = sync_point(nullptr)) return r;
    if (!inside(d, n)) return E_INVALID_VALUE;
    memset((void*)d, v, n);
    return OK;
}
API CUresult cuMemsetD32Async(CUdeviceptr d, unsigned v, size_t n, void* s) {
    LOCK;
    if (!inside(d, n * 4)) return E_INVALID_VALUE;
    return submit(s, [=] {
        for (size_t i = 0; i < n; i++) ((unsigned*)d)[i] = v;
        return OK;
    });
}

// ---- streams and events ---------------------------------------------------------------------

API CUresult cuStreamCreate(void** s, unsigned) {
    LOCK;
    Stream* t = new Stream();
    streams.insert(t);
    *s = t;
    return OK;
}
API CUresult cuStreamCreateWithPriority(void** s, unsigned f, int) { return cuStreamCreate(s, f); }
API CUresult cuStreamDestroy_v2(void* s) {
    LOCK;
    if (streams.erase((Stream*)s)) delete (Stream*)s;
    return OK;
}
API CUresult cuStreamSynchronize(void* s) {
    LOCK;
    if (st(s)->capture) return sync_point(s);
    return sticky;
}
API CUresult cuStreamQuery(void* s) { return cuStreamSynchronize(s); }
API CUresult cuStreamWaitEvent(void*, void*, unsigned) { return OK; }

struct Event {
    double ms = 0;
};
API CUresult cuEventCreate(void** e, unsigned) {
    *e = new Event();
    return OK;
}
API CUresult cuEventDestroy_v2(void* e) {
    delete (Event*)e;
    return OK;
}
API CUresult cuEventRecord(void* e, void* s) {
    LOCK;
    if (st(s)->capture) return OK;  // an event node; times nothing
    ((Event*)e)->ms = now_ms();
    return sticky;
}
API CUresult cuEventRecordWithFlags(void* e, void* s, unsigned) { return cuEventRecord(e, s); }
API CUresult cuEventSynchronize(void*) { return sticky; }
API CUresult cuEventQuery(void*) { return sticky; }
API CUresult cuEventElapsedTime(float* ms, void* a, void* b) {
    *ms = (float)(((Event*)b)->ms - ((Event*)a)->ms);
    return OK;
}
API CUresult cuEventElapsedTime_v2(float* ms, void* a, void* b) { return cuEventElapsedTime(ms, a, b); }

API CUresult cuStreamBeginCapture_v2(void* s, int) {
    LOCK;
    Stream* t = st(s);
    if (!s || t->capture) return E_CAPTURE_UNSUPPORTED;  // the legacy stream cannot capture
    t->capture = 1;
    t->ops.clear();
    return OK;
}
API CUresult cuStreamEndCapture(void* s, void** graph) {
    LOCK;
    Stream* t = st(s);
    if (!t->capture) return E_INVALID_VALUE;
    int was = t->capture;
    t->capture = 0;
    std::vector<Op> ops;
    ops.swap(t->ops);
    *graph = nullptr;
    if (was == 2) return E_CAPTURE_INVALIDATED;
    if (ops.empty()) return OK;
    *graph = new Graph{std::move(ops)};
    return OK;
}
API CUresult cuStreamIsCapturing(void* s, int* status) {
    LOCK;
    *status = st(s)->capture;
    return OK;
}
API CUresult cuGraphInstantiateWithFlags(void** exec, void* graph, unsigned long long) {
    *exec = new Graph(*(Graph*)graph);
    return OK;
}
API CUresult cuGraphUpload(void*, void*) { return OK; }
API CUresult cuGraphLaunch(void* exec, void* s) {
    LOCK;
    Graph* g = (Graph*)exec;
    if (st(s)->capture) return E_NOT_SUPPORTED;  // arbor never nests graphs
    for (Op& op : g->ops)
        if (CUresult r = submit(s, op)) return r;
    return OK;
}
API CUresult cuGraphDestroy(void* g) {
    delete (Graph*)g;
    return OK;
}
API CUresult cuGraphExecDestroy(void* g) {
    delete (Graph*)g;
    return OK;
}

// ---- modules and launches -------------------------------------------------------------------

API CUresult cuModuleLoadData(void** module, const void* image) {
    LOCK;
    load_libs();
    if (!load_error.empty()) {
        fprintf(stderr, "fake CUDA: %s\n", load_error.c_str());
        return E_INVALID_IMAGE;
    }
    Module* m = new Module();
    const char* p = (const char*)image;
    if (p && memcmp(p, "\x7f" "ELF", 4) != 0) {
        // PTX: every `.entry NAME(` it declares.
        std::string ptx(p);
        size_t at = 0;
        while ((at = ptx.find(".entry ", at)) != std::string::npos) {
            at += 7;
            size_t end = ptx.find_first_of("( \n", at);
            m->entries.insert(ptx.substr(at, end - at));
        }
    }
    *module = m;
    return OK;
}
API CUresult cuModuleUnload(void* m) {
    delete (Module*)m;
    return OK;
}
API CUresult cuModuleGetFunction(void** f, void* module, const char* name) {
    LOCK;
    Module* m = (Module*)module;
    if (!m->entries.empty() && !m->entries.count(name)) return E_NOT_FOUND;
    for (const EmuLib& l : libs) {
        const int* s = l.sizes(name);
        if (!s) continue;
        Func* fn = new Func{name, &l, {}};
        for (int i = 0; s[i] >= 0; i++) fn->sizes.push_back(s[i]);
        *f = fn;
        return OK;
    }
    fprintf(stderr, "fake CUDA: kernel %s is in no emulator library\n", name);
    return E_NOT_FOUND;
}
API CUresult cuFuncSetAttribute(void*, int, int) { return OK; }
API CUresult cuFuncGetAttribute(int* v, int, void*) {
    *v = 0;
    return OK;
}
API CUresult cuFuncSetCacheConfig(void*, int) { return OK; }

API CUresult cuLaunchKernel(void* f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                            unsigned by, unsigned bz, unsigned shared, void* s, void** params,
                            void** extra) {
    LOCK;
    Func* fn = (Func*)f;
    if (extra || (!params && !fn->sizes.empty())) return E_INVALID_VALUE;
    if (shared > 0) {
        fprintf(stderr, "fake CUDA: %s asks for %u bytes of dynamic shared memory, which the "
                        "emulator does not provide\n", fn->name.c_str(), shared);
        return E_NOT_SUPPORTED;
    }
    if ((unsigned long long)gx * gy * gz == 0 || gy > 65535 || gz > 65535 || bx * by * bz > 1024)
        return E_INVALID_VALUE;
    // The arguments' bytes now: a graph keeps them, later changes to the host values are unseen.
    auto bytes = std::make_shared<std::vector<std::vector<char>>>();
    for (size_t i = 0; i < fn->sizes.size(); i++)
        bytes->emplace_back((char*)params[i], (char*)params[i] + fn->sizes[i]);
    return submit(s, [=] {
        std::vector<void*> ptrs;
        for (auto& b : *bytes) ptrs.push_back(b.data());
        int r = fn->lib->launch(fn->name.c_str(), ptrs.data(), gx, gy, gz, bx, by, bz, 0);
        if (r != 0) {
            fprintf(stderr, "fake CUDA: kernel %s failed: %s\n", fn->name.c_str(),
                    fn->lib->error());
            return (CUresult)E_LAUNCH_FAILED;
        }
        return (CUresult)OK;
    });
}

// ---- cuBLASLt -------------------------------------------------------------------------------

typedef int cublasStatus_t;
enum { CUDA_R_32F = 0, CUDA_R_16BF = 14 };
struct LtDesc {
    int compute, scale, transa = 0, transb = 0;
};
struct LtLayout {
    int type;
    uint64_t rows, cols;
    int64_t ld;
};
struct LtAlgo {
    uint64_t data[8];
};
struct LtHeuristic {
    LtAlgo algo;
    size_t workspace;
    cublasStatus_t state;
    float waves;
    int reserved[4];
};
static int lt_handle;

API cublasStatus_t cublasLtCreate(void** h) {
    *h = &lt_handle;
    return 0;
}
API cublasStatus_t cublasLtDestroy(void*) { return 0; }
API cublasStatus_t cublasLtMatmulDescCreate(void** d, int compute, int scale) {
    *d = new LtDesc{compute, scale};
    return 0;
}
API cublasStatus_t cublasLtMatmulDescDestroy(void* d) {
    delete (LtDesc*)d;
    return 0;
}
API cublasStatus_t cublasLtMatmulDescSetAttribute(void* d, int attr, const void* v, size_t n) {
    LtDesc* x = (LtDesc*)d;
    if (attr == 3 && n == 4) x->transa = *(const int*)v;
    else if (attr == 4 && n == 4) x->transb = *(const int*)v;
    else return 15;  // CUBLAS_STATUS_NOT_SUPPORTED: an attribute this fake does not model
    return 0;
}
API cublasStatus_t cublasLtMatrixLayoutCreate(void** l, int type, uint64_t rows, uint64_t cols,
                                              int64_t ld) {
    if (ld < (int64_t)rows) return 7;  // CUBLAS_STATUS_INVALID_VALUE
    *l = new LtLayout{type, rows, cols, ld};
    return 0;
}
API cublasStatus_t cublasLtMatrixLayoutDestroy(void* l) {
    delete (LtLayout*)l;
    return 0;
}
API cublasStatus_t cublasLtMatmulPreferenceCreate(void** p) {
    *p = new int(0);
    return 0;
}
API cublasStatus_t cublasLtMatmulPreferenceDestroy(void* p) {
    delete (int*)p;
    return 0;
}
API cublasStatus_t cublasLtMatmulPreferenceSetAttribute(void*, int, const void*, size_t) {
    return 0;
}
API cublasStatus_t cublasLtMatmulAlgoGetHeuristic(void*, void*, void*, void*, void*, void*,
                                                  void*, int want, LtHeuristic* out, int* got) {
    if (want < 1) return 7;
    memset(out, 0, sizeof *out);
    *got = 1;
    return 0;
}

static float element(const LtLayout* l, const void* p, uint64_t r, uint64_t c) {
    uint64_t i = r + c * (uint64_t)l->ld;
    if (l->type == CUDA_R_32F) return ((const float*)p)[i];
    uint32_t b = (uint32_t)((const uint16_t*)p)[i] << 16;
    float f;
    memcpy(&f, &b, 4);
    return f;
}

API cublasStatus_t cublasLtMatmul(void*, void* desc, const void* alpha, const void* a,
                                  void* adesc, const void* b, void* bdesc, const void* beta,
                                  const void* c, void* cdesc, void* d, void* ddesc, const void*,
                                  void*, size_t, void* stream) {
    LOCK;
    const LtDesc* x = (const LtDesc*)desc;
    const LtLayout *la = (const LtLayout*)adesc, *lb = (const LtLayout*)bdesc,
                   *lc = (const LtLayout*)cdesc, *ld = (const LtLayout*)ddesc;
    // op(A) is m × k, op(B) is k × n, C and D are m × n.
    const uint64_t m = x->transa ? la->cols : la->rows, k = x->transa ? la->rows : la->cols;
    const uint64_t kb = x->transb ? lb->cols : lb->rows, n = x->transb ? lb->rows : lb->cols;
    if (k != kb || lc->rows != m || lc->cols != n || ld->rows != m || ld->cols != n ||
        lc->type != CUDA_R_32F || ld->type != CUDA_R_32F || x->scale != CUDA_R_32F ||
        (la->type != CUDA_R_16BF && la->type != CUDA_R_32F) ||
        (lb->type != CUDA_R_16BF && lb->type != CUDA_R_32F))
        return 7;
    const size_t esz_a = la->type == CUDA_R_32F ? 4 : 2, esz_b = lb->type == CUDA_R_32F ? 4 : 2;
    auto span = [](const LtLayout* l, size_t esz) { return ((l->cols - 1) * l->ld + l->rows) * esz; };
    if (!inside((CUdeviceptr)a, span(la, esz_a)) || !inside((CUdeviceptr)b, span(lb, esz_b)) ||
        !inside((CUdeviceptr)c, span(lc, 4)) || !inside((CUdeviceptr)d, span(ld, 4))) {
        fprintf(stderr, "fake CUDA: cublasLtMatmul reads or writes past a device buffer\n");
        return 7;
    }
    const float al = *(const float*)alpha, be = *(const float*)beta;
    // By value: a graph may run after the descriptors are gone.
    const LtDesc xd = *x;
    const LtLayout A = *la, B = *lb, C = *lc, D = *ld;
    CUresult r = submit(stream, [=] {
        const LtDesc* x = &xd;
        const LtLayout *la = &A, *lb = &B, *lc = &C, *ld = &D;
        // op(B)'s columns and op(A)'s rows as contiguous floats, then plain dot products.
        std::vector<float> bt(n * k), arow(k);
        for (uint64_t j = 0; j < n; j++)
            for (uint64_t p = 0; p < k; p++)
                bt[j * k + p] = x->transb ? element(lb, b, j, p) : element(lb, b, p, j);
        for (uint64_t i = 0; i < m; i++) {
            for (uint64_t p = 0; p < k; p++)
                arow[p] = x->transa ? element(la, a, p, i) : element(la, a, i, p);
            for (uint64_t j = 0; j < n; j++) {
                const float* bc = &bt[j * k];
                double acc = 0;
                for (uint64_t p = 0; p < k; p++) acc += (double)arow[p] * bc[p];
                float old = be != 0 ? ((const float*)c)[i + j * lc->ld] : 0.f;
                ((float*)d)[i + j * ld->ld] = (float)(al * acc + (be != 0 ? be * old : 0.0));
            }
        }
        return (CUresult)OK;
    });
    return r ? 14 : 0;  // CUBLAS_STATUS_INTERNAL_ERROR
}
