"""Runs arbor's CUDA kernels (kernels/*.cu) on the CPU, for checking them where no GPU is.

`Kernels("norm")` compiles kernels/norm.cu with emu.h and emu_runtime.cpp into a shared
library (cached under target/kernel-emu/, rebuilt when a source changes) and loads it.
`k.launch(name, grid, block, *args)` runs one kernel; arguments are `Buf` device buffers or
numpy scalars (np.int32, np.uint32, np.float32, np.uint64), checked against the kernel's
parameter sizes. Needs g++ and numpy only.
"""

import ctypes
import hashlib
import os
import re
import subprocess

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
KERNELS = os.path.join(ROOT, "kernels")
CACHE = os.path.join(ROOT, "target", "kernel-emu")

REGISTRY = """
#include <utility>
template <class... A, std::size_t... I>
static void emu_call_impl(void (*k)(A...), void** a, std::index_sequence<I...>) {
    k(*static_cast<A*>(a[I])...);
}
template <class... A>
static void emu_call(void (*k)(A...), void** a) {
    emu_call_impl(k, a, std::index_sequence_for<A...>{});
}
template <class... A>
static const int* emu_sizes(void (*)(A...)) {
    static const int s[] = {(int)sizeof(A)..., -1};
    return s;
}
int emu_run(const char*, void (*)(void**), void**, unsigned, unsigned, unsigned, unsigned,
            unsigned, unsigned, int);
struct EmuKernel {
    const char* name;
    void (*fn)(void**);
    const int* sizes;
};
#define EMU_ENTRY(k) {#k, [](void** a) { emu_call(k, a); }, emu_sizes(k)}
static const EmuKernel emu_table[] = {%s};
static const EmuKernel* emu_find(const char* name) {
    for (const EmuKernel& k : emu_table)
        if (std::string(k.name) == name) return &k;
    return nullptr;
}
extern "C" const int* emu_arg_sizes(const char* name) {
    const EmuKernel* k = emu_find(name);
    return k ? k->sizes : nullptr;
}
extern "C" int emu_launch(const char* name, void** args, unsigned gx, unsigned gy, unsigned gz,
                          unsigned bx, unsigned by, unsigned bz, int reverse) {
    const EmuKernel* k = emu_find(name);
    if (!k) return -2;
    return emu_run(name, k->fn, args, gx, gy, gz, bx, by, bz, reverse);
}
"""


class EmuError(RuntimeError):
    pass


def _build(cu):
    src = os.path.join(KERNELS, cu + ".cu")
    inc = os.path.join(KERNELS, "include")
    headers = sorted(os.path.join(inc, h) for h in os.listdir(inc) if h.endswith(".cuh"))
    files = [src, os.path.join(HERE, "emu.h"), os.path.join(HERE, "emu_runtime.cpp"),
             *headers, os.path.abspath(__file__)]
    parts = [open(p, "rb").read() for p in files]
    opt = os.environ.get("EMU_OPT", "-O1").encode()
    key = hashlib.sha256(b"".join(parts) + REGISTRY.encode() + opt).hexdigest()[:16]
    os.makedirs(CACHE, exist_ok=True)
    lib = os.path.join(CACHE, f"{cu}-{key}.so")
    if os.path.exists(lib):
        return lib
    flags = ["-std=c++17", os.environ.get("EMU_OPT", "-O1"), "-g", "-ffp-contract=off", "-fno-strict-aliasing",
             "-I", HERE, "-I", os.path.join(KERNELS, "include"), "-include", "emu.h"]
    # The kernel names, from the preprocessed source (macros make some of them).
    pre = subprocess.run(["g++", "-E", "-P", "-x", "c++", *flags, "-DEMU_SCAN",
                          src], capture_output=True, text=True)
    if pre.returncode != 0:
        raise EmuError(f"preprocessing {src}:\n{pre.stderr}")
    names = re.findall(r'extern\s+"C"\s+EMU_KERNEL\s+void\s+(\w+)\s*\(', pre.stdout)
    if not names:
        raise EmuError(f"no kernels found in {src}")
    gen = os.path.join(CACHE, f"{cu}-{key}.cpp")
    with open(gen, "w") as f:
        f.write(f'#include <string>\n#include "{src}"\n')
        f.write(REGISTRY.replace("%s", ", ".join(f"EMU_ENTRY({n})" for n in names)))
    cmd = ["g++", *flags, "-fPIC", "-shared", "-o", lib + ".tmp", gen,
           os.path.join(HERE, "emu_runtime.cpp")]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise EmuError(f"compiling {src} for the emulator:\n{r.stderr[-6000:]}")
    os.replace(lib + ".tmp", lib)
    return lib


class Buf:
    """A device buffer (between guard pages) holding a numpy array's bytes."""

    def __init__(self, lib, arr):
        arr = np.ascontiguousarray(arr)
        self.dtype, self.shape, self.nbytes = arr.dtype, arr.shape, arr.nbytes
        self.ptr = lib.emu_alloc(ctypes.c_size_t(max(arr.nbytes, 1)))
        if not self.ptr:
            raise EmuError("out of memory")
        ctypes.memmove(self.ptr, arr.ctypes.data, arr.nbytes)

    def get(self):
        out = np.empty(self.shape, self.dtype)
        ctypes.memmove(out.ctypes.data, self.ptr, self.nbytes)
        return out


class Null:
    """A null device pointer argument (`Kernels.null()`)."""

    ptr = None


class Kernels:
    """The kernels of one kernels/*.cu file, compiled for the emulator."""

    def __init__(self, cu):
        self.lib = ctypes.CDLL(_build(cu))
        self.lib.emu_alloc.restype = ctypes.c_void_p
        self.lib.emu_alloc.argtypes = [ctypes.c_size_t]
        self.lib.emu_error.restype = ctypes.c_char_p
        self.lib.emu_arg_sizes.restype = ctypes.POINTER(ctypes.c_int)
        self.lib.emu_launch.argtypes = [ctypes.c_char_p, ctypes.c_void_p] + \
            [ctypes.c_uint] * 6 + [ctypes.c_int]
        # Threads of each block run forward (0) or backward (1): see `both_orders`.
        self.reverse = 0

    def buf(self, arr):
        return Buf(self.lib, arr)

    def null(self):
        return Null()

    def launch(self, name, grid, block, *args):
        sizes = self.lib.emu_arg_sizes(name.encode())
        if not sizes:
            raise EmuError(f"no kernel {name}")
        want = []
        while sizes[len(want)] >= 0:
            want.append(sizes[len(want)])
        if len(want) != len(args):
            raise EmuError(f"{name} takes {len(want)} arguments, {len(args)} given")
        keep, ptrs = [], (ctypes.c_void_p * max(len(args), 1))()
        for i, (a, w) in enumerate(zip(args, want)):
            if isinstance(a, (Buf, Null)):
                v = ctypes.c_void_p(a.ptr)
                size = 8
            else:
                a = np.asarray(a)
                if a.dtype.kind not in "iuf" or a.shape != ():
                    raise EmuError(f"{name} argument {i}: a Buf or numpy scalar, not {a!r}")
                v = ctypes.create_string_buffer(a.tobytes(), a.nbytes)
                size = a.nbytes
            if size != w:
                raise EmuError(f"{name} argument {i}: {size} bytes given, the kernel takes {w}")
            keep.append(v)
            ptrs[i] = ctypes.cast(ctypes.pointer(v), ctypes.c_void_p)
        g = tuple(grid) + (1,) * (3 - len(grid))
        b = tuple(block) + (1,) * (3 - len(block))
        rc = self.lib.emu_launch(name.encode(), ptrs, *g, *b, self.reverse)
        if rc != 0:
            raise EmuError(self.lib.emu_error().decode())


def both_orders(k, run):
    """`run()` with the blocks, and the threads of each block, run forward, then backward;
    the two results must be equal bit for bit (a difference is a missing barrier, or blocks
    whose result depends on their order). Returns the first."""
    k.reverse = 0
    a = run()
    k.reverse = 1
    b = run()
    k.reverse = 0
    for x, y in zip(_flat(a), _flat(b)):
        if x.tobytes() != y.tobytes():
            raise EmuError("results differ when the blocks and their threads run in another "
                           "order (a missing barrier or a race)")
    return a


def _flat(x):
    return list(x) if isinstance(x, (tuple, list)) else [x]


# bf16 as uint16 bit patterns, as the kernels hold it.
def to_bf16(x):
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(np.asarray(x, np.float32))
    return np.where(nan, np.uint16(0x7FC0), r)


def from_bf16(b):
    return (np.asarray(b, np.uint16).astype(np.uint32) << 16).view(np.float32)


def nmse(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if not np.all(np.isfinite(got)):
        return float("inf")
    d = np.sum(want * want)
    return float(np.sum((got - want) ** 2) / (d if d > 0 else 1.0))
