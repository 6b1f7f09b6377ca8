// CPU emulation of the CUDA execution model, enough to run hpcattn's kernels unmodified.
//
// Force-included (g++ -include cuda_emu.h) in front of the kernel sources. A launch runs the
// thread blocks one at a time; inside a block every CUDA thread is a fiber (ucontext) on the
// calling OS thread, switched only at __syncthreads() and at warp collectives, so the result is
// deterministic. What is emulated:
//   - threadIdx / blockIdx / blockDim / gridDim, __global__/__device__/__forceinline__ etc.;
//   - __syncthreads(): a barrier of the whole block; reaching it with some threads exited, or a
//     warp collective with some lanes elsewhere, is reported as an error (a hang on a GPU);
//   - __shfl_xor_sync(0xffffffff, v, m) and __syncwarp() as warp collectives;
//   - the tensor-core instruction mma.sync.m16n8k16 (fp16/bf16 -> fp32) as a warp collective that
//     reassembles A, B from the 32 lanes' registers in the layout the PTX ISA documents (kernels
//     reach it through `#if defined(HPCATTN_EMULATION)` around their one asm statement);
//   - dynamic shared memory: every `extern __shared__ T name[];` is one page-aligned buffer,
//     filled with 0xFF bytes (NaN as float) before each block, and the pages past the launch's
//     shared-memory size are made inaccessible, so an overrun faults instead of passing;
//   - float4 / uint2 / uint4 / make_float4; math from the host libm; __half and __nv_bfloat16
//     in the emulated cuda_fp16.h / cuda_bf16.h beside this file.
// Static (non-extern) __shared__ variables are not supported: hpcattn/emulation refuses sources
// that declare them.
#pragma once

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <tuple>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __shared__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define HPCATTN_EMULATION 1

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
struct alignas(16) float4 {
    float x, y, z, w;
};
struct alignas(8) float2 {
    float x, y;
};
struct alignas(16) uint4 {
    unsigned x, y, z, w;
};
struct alignas(8) uint2 {
    unsigned x, y;
};
// A 16-bit float type of cuda_fp16.h / cuda_bf16.h: storage, conversions, raw bits.
#define EMU_16BIT_FLOAT(TYPE, IS_BF16, DECODE, ENCODE_RN, TO_FLOAT, FROM_FLOAT_RN, FROM_FLOAT, AS_USHORT) \
    struct TYPE {                                                                                  \
        unsigned short __x;                                                                        \
        static constexpr bool emu_bf16 = IS_BF16;                                                  \
    };                                                                                             \
    inline float TO_FLOAT(TYPE h) { return emu::DECODE(h.__x); }                                   \
    inline TYPE FROM_FLOAT_RN(float f) { return TYPE{emu::ENCODE_RN(f)}; }                         \
    inline TYPE FROM_FLOAT(float f) { return FROM_FLOAT_RN(f); }                                   \
    inline unsigned short AS_USHORT(TYPE h) { return h.__x; }

inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }

namespace emu {

// ---- half / bfloat16 conversions (round to nearest even, like the GPU's _rn intrinsics) ----
inline uint32_t bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
inline float from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

inline float f16_to_f32(uint16_t h) {
    const uint32_t sign = uint32_t(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0) {  // zero or subnormal: m * 2^-24, exact in float
        const float f = ldexpf(float(m), -24);
        return sign ? -f : f;
    }
    if (e == 31) return from_bits(sign | 0x7f800000u | (m << 13));
    return from_bits(sign | ((e + 112u) << 23) | (m << 13));
}

inline uint16_t f32_to_f16_rn(float f) {
    const uint32_t x = bits(f), sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax >= 0x7f800000u) return uint16_t(sign | 0x7c00u | (ax > 0x7f800000u ? 0x200u : 0u));
    if (ax >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // >= 65520 rounds to inf
    if (ax < 0x38800000u)                                    // below 2^-14: subnormal half
        return uint16_t(sign | uint32_t(nearbyintf(from_bits(ax) * 16777216.0f)));
    return uint16_t(sign | ((ax + 0xfffu + ((ax >> 13) & 1u) - 0x38000000u) >> 13));
}

inline float bf16_to_f32(uint16_t h) { return from_bits(uint32_t(h) << 16); }

inline uint16_t f32_to_bf16_rn(float f) {
    const uint32_t x = bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return uint16_t((x >> 16) | 0x40u);  // quiet NaN
    return uint16_t((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

// ---- fibers ----
enum State { RUNNING, AT_SYNCTHREADS, AT_WARP, DONE };

struct Fiber {
    ucontext_t ctx;
    dim3 idx;
    State state;
    unsigned long long warp_calls;  // warp collectives passed (all lanes must agree)
};

constexpr size_t STACK_BYTES = 256 * 1024;
constexpr unsigned MAX_THREADS = 1024;

struct Launch {
    Fiber fibers[MAX_THREADS];
    char* stacks = nullptr;
    unsigned nthreads = 0;
    ucontext_t scheduler;
    Fiber* current = nullptr;
    void (*body)(void*) = nullptr;
    void* body_arg = nullptr;
    const char* error = nullptr;
    unsigned long long shuffle[MAX_THREADS / 32][2][32];  // two slots per warp, by parity
    struct MmaRegs {
        unsigned a[4], b[2];
    } mma[MAX_THREADS / 32][2][32];
};

inline Launch& launch_state() {
    static Launch s;
    return s;
}
inline dim3 g_blockIdx, g_blockDim, g_gridDim;

inline void fail(const char* msg) {
    Launch& L = launch_state();
    if (!L.error) L.error = msg;
}

inline void yield(State s) {
    Launch& L = launch_state();
    Fiber* f = L.current;
    f->state = s;
    swapcontext(&f->ctx, &L.scheduler);
}

inline void fiber_main() {
    Launch& L = launch_state();
    L.body(L.body_arg);
    L.current->state = DONE;
    // returning resumes uc_link = the scheduler
}

inline unsigned linear(const Fiber& f) {
    return f.idx.x + g_blockDim.x * (f.idx.y + g_blockDim.y * f.idx.z);
}

// Run one block to completion; false (with L.error set) on a barrier/collective mismatch.
inline bool run_block() {
    Launch& L = launch_state();
    const unsigned n = L.nthreads;
    for (unsigned t = 0; t < n; ++t) {
        Fiber& f = L.fibers[t];
        f.idx = dim3{t % g_blockDim.x, (t / g_blockDim.x) % g_blockDim.y, t / (g_blockDim.x * g_blockDim.y)};
        f.state = RUNNING;
        f.warp_calls = 0;
        getcontext(&f.ctx);
        f.ctx.uc_stack.ss_sp = L.stacks + size_t(t) * STACK_BYTES;
        f.ctx.uc_stack.ss_size = STACK_BYTES;
        f.ctx.uc_link = &L.scheduler;
        makecontext(&f.ctx, fiber_main, 0);
    }
    for (;;) {
        for (unsigned t = 0; t < n; ++t) {
            Fiber& f = L.fibers[t];
            if (f.state != RUNNING) continue;
            L.current = &f;
            swapcontext(&L.scheduler, &f.ctx);
            if (L.error) return false;
            if (f.state == AT_WARP) {  // release the warp once all 32 lanes arrived
                const unsigned w0 = t / 32 * 32;
                bool all = true;
                for (unsigned i = w0; i < w0 + 32; ++i) all = all && L.fibers[i].state == AT_WARP;
                if (all) {
                    for (unsigned i = w0; i < w0 + 32; ++i) {
                        if (L.fibers[i].warp_calls != f.warp_calls)
                            fail("lanes of a warp met at different warp collectives");
                        L.fibers[i].state = RUNNING;
                    }
                    if (L.error) return false;
                }
            }
        }
        unsigned done = 0, at_sync = 0, at_warp = 0;
        for (unsigned t = 0; t < n; ++t) {
            done += L.fibers[t].state == DONE;
            at_sync += L.fibers[t].state == AT_SYNCTHREADS;
            at_warp += L.fibers[t].state == AT_WARP;
        }
        if (done == n) return true;
        if (at_sync == n) {
            for (unsigned t = 0; t < n; ++t) L.fibers[t].state = RUNNING;
            continue;
        }
        if (at_sync + at_warp + done == n && at_sync + done > 0) {
            fail(at_warp ? "a warp collective was not reached by all 32 lanes (a hang on the GPU)"
                         : "__syncthreads() was not reached by every thread of the block");
            return false;
        }
    }
}

// All lanes of the calling warp wait here (a warp collective); returns this lane's index.
inline unsigned warp_barrier(unsigned* warp = nullptr, unsigned long long* call = nullptr) {
    Fiber* f = launch_state().current;
    const unsigned t = linear(*f);
    if (warp) *warp = t / 32;
    if (call) *call = f->warp_calls;
    ++f->warp_calls;
    yield(AT_WARP);
    return t % 32;
}

// d += A(16x16) * B(16x8) with A, B spread over the warp's registers as mma.m16n8k16 has them
// (PTX ISA, "Matrix Fragments for mma.m16n8k16"): lane = 4 * group + tig.
template <class T>
void mma_m16n8k16(float d[4], const unsigned a[4], const unsigned b[2]) {
    Launch& L = launch_state();
    const unsigned t = linear(*L.current), warp = t / 32, lane = t % 32;
    auto& slot = L.mma[warp][L.current->warp_calls & 1];
    memcpy(slot[lane].a, a, sizeof slot[lane].a);
    memcpy(slot[lane].b, b, sizeof slot[lane].b);
    warp_barrier();
    auto half = [](unsigned w, int k) -> float {
        const uint16_t h = uint16_t((k & 1) ? w >> 16 : w & 0xffffu);
        return T::emu_bf16 ? bf16_to_f32(h) : f16_to_f32(h);
    };
    auto A = [&](int r, int k) { return half(slot[(r % 8) * 4 + (k % 8) / 2].a[(r >= 8) + 2 * (k >= 8)], k); };
    auto B = [&](int k, int n) { return half(slot[n * 4 + (k % 8) / 2].b[k >= 8], k); };
    const int g = int(lane) / 4, tig = int(lane) % 4;
    for (int e = 0; e < 4; ++e) {
        const int r = g + 8 * (e >= 2), c = 2 * tig + (e & 1);
        double dot = 0.0;  // products are exact and summed wide on the tensor core
        for (int k = 0; k < 16; ++k) dot += double(A(r, k)) * double(B(k, c));
        d[e] = float(double(d[e]) + dot);
    }
}

// ---- launch: unpack a CUDA-style void** argument array into the kernel's parameters ----
template <class... A, size_t... I>
std::tuple<A...> unpack(void** args, std::index_sequence<I...>) {
    return std::tuple<A...>(*static_cast<std::remove_reference_t<A>*>(args[I])...);
}

template <class... A>
struct Call {
    void (*kernel)(A...);
    std::tuple<A...> args;
    static void run(void* self) {
        Call* c = static_cast<Call*>(self);
        std::apply(c->kernel, c->args);
    }
};

// Per-parameter kind letter: 'p' pointer, 'i' 32-bit int, 'f' float (hpcattn.gpu.kernels.Arg).
template <class T>
constexpr char kind_of() {
    return std::is_pointer_v<T> ? 'p'
           : (std::is_same_v<T, int> ? 'i' : (std::is_same_v<T, float> ? 'f' : '?'));
}
template <class... A>
constexpr bool signature_is(void (*)(A...), const char* want) {
    const char got[] = {kind_of<A>()..., '\0'};
    for (size_t i = 0; i <= sizeof...(A); ++i)
        if (got[i] != want[i]) return false;
    return true;
}

// Returns nullptr on success or the error message.
template <class... A>
const char* launch(void (*kernel)(A...), const unsigned grid[3], const unsigned block[3], size_t smem,
                   void** args, unsigned char* shared, size_t shared_capacity) {
    Launch& L = launch_state();
    L.error = nullptr;
    const size_t nthreads = size_t(block[0]) * block[1] * block[2];
    if (nthreads == 0 || nthreads > MAX_THREADS || nthreads % 32)
        return "block size must be a positive multiple of 32, at most 1024";
    if (smem > shared_capacity) return "dynamic shared memory exceeds the emulator's buffer";
    const size_t page = 4096, used = (smem + page - 1) / page * page;
    if (!L.stacks) {
        L.stacks = static_cast<char*>(mmap(nullptr, MAX_THREADS * STACK_BYTES, PROT_READ | PROT_WRITE,
                                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
        if (L.stacks == MAP_FAILED) { L.stacks = nullptr; return "cannot map fiber stacks"; }
    }
    if (used < shared_capacity && mprotect(shared + used, shared_capacity - used, PROT_NONE))
        return "cannot protect the shared-memory guard pages";
    Call<A...> call{kernel, unpack<A...>(args, std::index_sequence_for<A...>{})};
    L.body = &Call<A...>::run;
    L.body_arg = &call;
    L.nthreads = unsigned(nthreads);
    g_blockDim = dim3{block[0], block[1], block[2]};
    g_gridDim = dim3{grid[0], grid[1], grid[2]};
    for (unsigned z = 0; z < grid[2] && !L.error; ++z)
        for (unsigned y = 0; y < grid[1] && !L.error; ++y)
            for (unsigned x = 0; x < grid[0] && !L.error; ++x) {
                g_blockIdx = dim3{x, y, z};
                memset(shared, 0xff, smem);
                run_block();
            }
    mprotect(shared, shared_capacity, PROT_READ | PROT_WRITE);
    return L.error;
}

}  // namespace emu

#define threadIdx (::emu::launch_state().current->idx)
#define blockIdx (::emu::g_blockIdx)
#define blockDim (::emu::g_blockDim)
#define gridDim (::emu::g_gridDim)

inline void __syncthreads() { emu::yield(emu::AT_SYNCTHREADS); }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
    if (mask != 0xffffffffu) emu::fail("__syncwarp with a partial mask is not emulated");
    emu::warp_barrier();
}
inline void __trap() { emu::fail("__trap() called"); }

template <class T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
    static_assert(sizeof(T) <= 8, "shuffle of more than 8 bytes");
    emu::Launch& L = emu::launch_state();
    emu::Fiber* f = L.current;
    if (mask != 0xffffffffu) emu::fail("__shfl_xor_sync with a partial mask is not emulated");
    const unsigned t = emu::linear(*f), warp = t / 32, lane = t % 32;
    auto& slot = L.shuffle[warp][f->warp_calls & 1];
    memcpy(&slot[lane], &value, sizeof(T));
    emu::warp_barrier();  // all 32 lanes have written their value when this returns
    T result;
    memcpy(&result, &slot[(lane ^ unsigned(lane_mask)) & 31u], sizeof(T));
    return result;
}
