// Shared by ops.cu and matvec.cu.
#pragma once

// Programmatic dependent launch (launch.rs): a kernel may be placed while its
// predecessor still runs; it lets its own dependents be placed at once and waits for
// its predecessors to complete (and their writes to be visible) before anything else.
// Weight loads (never written by a kernel) may go between PDL_TRIGGER and PDL_WAIT.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#ifdef DS4_TRACE
#define DS4_TRACE_CAP 262143ULL
// Timing diagnostic (DS4_TRACE=1, launch.rs): thread 0 of block 0 notes when its wait
// returned (global timer, grid and block shape); the host sets the buffer.
__device__ unsigned long long* ds4_trace_ptr;
// One entry: the global timer now and `info`, at the next free slot of the buffer.
__device__ __forceinline__ void ds4_trace_put(unsigned long long* b, unsigned long long info) {
    unsigned long long t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    const unsigned long long i = atomicAdd(b, 1ULL);
    if (i < DS4_TRACE_CAP) {
        b[2 + 2 * i] = t;
        b[3 + 2 * i] = info;
    }
}
__device__ __forceinline__ void ds4_trace_mark(unsigned long long tag) {
    unsigned long long* b = ds4_trace_ptr;
    if (!b || blockIdx.x | blockIdx.y | blockIdx.z | threadIdx.x | threadIdx.y) return;
    ds4_trace_put(b, (unsigned long long)gridDim.x | ((unsigned long long)gridDim.y << 20) |
                         ((unsigned long long)blockDim.x << 40) | tag);
}
// Every block's own moments (bit 62, `what` in bits 56..61, the grid's block count in bits
// 20..39, the block's linear index in bits 0..19): e.g. the TMA products note when each
// block was placed (0), its wait returned (1), warp 0's first ring was in (2) and it
// ended (3); the routed and Q8_0 register products use 8..15 and 16..23 (matvec.cu).
__device__ __forceinline__ void ds4_trace_block(unsigned long long what) {
    unsigned long long* b = ds4_trace_ptr;
    if (!b || threadIdx.x | threadIdx.y) return;
    // 2-D grids: the block's linear index and the whole count.
    ds4_trace_put(b, (1ULL << 62) | (what << 56) |
                         (unsigned long long)(gridDim.x * gridDim.y) << 20 |
                         (blockIdx.y * gridDim.x + blockIdx.x));
}
#define TRACE_BLOCK(what) ds4_trace_block(what)
// The trigger's entry (bit 63) tells when block 0 was placed.
#define PDL_TRIGGER()                                                      \
    do {                                                                   \
        ds4_trace_mark(1ULL << 63);                                        \
        asm volatile("griddepcontrol.launch_dependents;" ::: "memory");    \
    } while (0)
#define PDL_WAIT()                                              \
    do {                                                        \
        asm volatile("griddepcontrol.wait;" ::: "memory");      \
        ds4_trace_mark(0);                                      \
    } while (0)
#else
#define TRACE_BLOCK(what)
#define PDL_TRIGGER() asm volatile("griddepcontrol.launch_dependents;" ::: "memory")
#define PDL_WAIT() asm volatile("griddepcontrol.wait;" ::: "memory")
#endif
#else
#define TRACE_BLOCK(what)
#define PDL_TRIGGER()
#define PDL_WAIT()
#endif
#define PDL_START() \
    do {            \
        PDL_TRIGGER(); \
        PDL_WAIT();    \
    } while (0)

// Loads of weights or constants (never written by a kernel) kept where they are written,
// before a PDL wait: asm volatile, since the compiler moves plain read-only loads below
// the wait (seen in SASS). They arrive while the previous kernel finishes.
__device__ __forceinline__ float ld_const_f32(const float* p) {
    float v;
    asm volatile("ld.global.nc.f32 %0, [%1];" : "=f"(v) : "l"(p));
    return v;
}
__device__ __forceinline__ float4 ld_const_f32x4(const float* p) {
    float4 v;
    asm volatile("ld.global.nc.v4.f32 {%0, %1, %2, %3}, [%4];"
                 : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
                 : "l"(p));
    return v;
}
