// CUDA on the CPU, for checking arbor's kernels on a machine with no GPU (scripts/kernel_emu).
//
// A kernel file is compiled as C++ after this header. Each thread of a block is a fiber;
// blocks run one after another. A fiber runs until it reaches a barrier (__syncthreads, a
// warp collective), so shared memory is plain `static` storage and warp collectives exchange
// values through a per-thread slot. This finds wrong indices and wrong arithmetic, reads past
// a buffer (buffers end at a guard page), barriers some threads never reach (deadlock), and
// - by running the threads of each block in a second order and comparing - many missing
// barriers. It does not find races that only real parallel hardware shows.
#pragma once
#include <math.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
extern dim3 threadIdx, blockIdx, blockDim, gridDim;

#ifdef EMU_SCAN
#define __global__ EMU_KERNEL  // marks kernels for emu.py's name scan
#else
#define __global__
#endif
#define __device__
#define __host__
#define __forceinline__ inline
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)

// Barriers and warp collectives (emu_runtime.cpp). Shared memory is static storage whose
// address a kernel never takes out, so the compiler may assume a call cannot change it and
// keep it in registers across a barrier: the memory clobbers forbid that.
void emu_syncthreads_();
void emu_warp_barrier_(unsigned mask);
inline void emu_syncthreads() {
    asm volatile("" ::: "memory");
    emu_syncthreads_();
    asm volatile("" ::: "memory");
}
inline void emu_warp_barrier(unsigned mask) {
    asm volatile("" ::: "memory");
    emu_warp_barrier_(mask);
    asm volatile("" ::: "memory");
}
unsigned emu_lane();
uint64_t* emu_slots();  // one 64-bit exchange slot per thread of the block
unsigned emu_linear_tid();

inline void __syncthreads() { emu_syncthreads(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { emu_warp_barrier(mask); }

template <class T>
inline uint64_t emu_bits(T v) {
    static_assert(sizeof(T) <= 8, "warp exchange of a value over 8 bytes");
    uint64_t b = 0;
    std::memcpy(&b, &v, sizeof(T));
    return b;
}
template <class T>
inline T emu_from_bits(uint64_t b) {
    T v;
    std::memcpy(&v, &b, sizeof(T));
    return v;
}

// Every lane of `mask` deposits `v`; returns the value lane `src` (of this warp) deposited.
template <class T>
inline T emu_exchange(unsigned mask, T v, unsigned src) {
    uint64_t* s = emu_slots();
    unsigned me = emu_linear_tid(), base = me - emu_lane();
    s[me] = emu_bits(v);
    emu_warp_barrier(mask);
    T r = emu_from_bits<T>(s[base + src]);
    emu_warp_barrier(mask);
    return r;
}

template <class T>
inline T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
    unsigned lane = emu_lane();
    unsigned src = lane ^ (unsigned)lane_mask;
    if ((src & ~(unsigned)(width - 1)) != (lane & ~(unsigned)(width - 1))) src = lane;
    return emu_exchange(mask, v, src);
}
template <class T>
inline T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    unsigned lane = emu_lane(), seg = lane & ~(unsigned)(width - 1);
    unsigned src = (lane >= seg + delta) ? lane - delta : lane;
    return emu_exchange(mask, v, src);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    unsigned lane = emu_lane(), seg = lane & ~(unsigned)(width - 1);
    unsigned src = (lane + delta < seg + (unsigned)width) ? lane + delta : lane;
    return emu_exchange(mask, v, src);
}
template <class T>
inline T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
    unsigned lane = emu_lane(), seg = lane & ~(unsigned)(width - 1);
    return emu_exchange(mask, v, seg + ((unsigned)src_lane % (unsigned)width));
}

// Collectives over the lanes of `mask`: `f(lane value of lane i)` folded by the caller.
template <class T, class F>
inline void emu_over_mask(unsigned mask, T v, F f) {
    uint64_t* s = emu_slots();
    unsigned me = emu_linear_tid(), base = me - emu_lane();
    s[me] = emu_bits(v);
    emu_warp_barrier(mask);
    for (unsigned i = 0; i < 32; i++)
        if (mask >> i & 1u) f(i, emu_from_bits<T>(s[base + i]));
    emu_warp_barrier(mask);
}
inline unsigned __reduce_add_sync(unsigned mask, unsigned v) {
    unsigned sum = 0;
    emu_over_mask(mask, v, [&](unsigned, unsigned x) { sum += x; });
    return sum;
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
    unsigned out = 0;
    emu_over_mask(mask, pred ? 1u : 0u, [&](unsigned i, unsigned x) { out |= x << i; });
    return out;
}
inline int __all_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) == mask; }
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
template <class T>
inline unsigned __match_any_sync(unsigned mask, T v) {
    unsigned out = 0;
    emu_over_mask(mask, v, [&](unsigned i, T x) {
        if (x == v) out |= 1u << i;
    });
    return out;
}

// Atomics (the kernels use only atomicAdd): fibers switch only at barriers, so a plain
// read-modify-write is atomic here.
template <class T>
inline T atomicAdd(T* p, T v) {
    T old = *p;
    *p = old + v;
    return old;
}
// Bit casts and integer intrinsics.
inline float __int_as_float(int x) { return emu_from_bits<float>((uint32_t)x); }
inline float __uint_as_float(unsigned x) { return emu_from_bits<float>(x); }
inline int __float_as_int(float f) { return (int)(uint32_t)emu_bits(f); }
inline unsigned __float_as_uint(float f) { return (uint32_t)emu_bits(f); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
template <class T>
inline T __ldg(const T* p) { return *p; }

// Float intrinsics: the _rn forms are IEEE operations (built with -ffp-contract=off, so no
// fused multiply-add sneaks in).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline float __double2float_rn(double x) { return (float)x; }
inline unsigned long long __double2ull_rz(double x) {
    return x <= 0.0 ? 0ull : (x >= 18446744073709551615.0 ? ~0ull : (unsigned long long)x);
}
inline float __uint2float_rn(unsigned x) { return (float)x; }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
using std::isinf;
using std::isnan;

// CUDA's integer and float min/max overloads, as one template (by value: the common type).
template <class A, class B>
inline std::common_type_t<A, B> min(A a, B b) { return a < b ? a : b; }
template <class A, class B>
inline std::common_type_t<A, B> max(A a, B b) { return a < b ? b : a; }

// Vector types.
struct __attribute__((aligned(16))) float4 { float x, y, z, w; };
struct __attribute__((aligned(8))) float2 { float x, y; };
struct __attribute__((aligned(16))) uint4 { unsigned x, y, z, w; };
struct __attribute__((aligned(8))) uint2 { unsigned x, y; };
struct __attribute__((aligned(16))) int4 { int x, y, z, w; };
struct __attribute__((aligned(8))) int2 { int x, y; };
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline float2 make_float2(float x, float y) { return {x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
inline int4 make_int4(int x, int y, int z, int w) { return {x, y, z, w}; }
inline int2 make_int2(int x, int y) { return {x, y}; }
