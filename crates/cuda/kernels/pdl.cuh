// Shared by ops.cu and matvec.cu.
#pragma once

// Programmatic dependent launch (launch.rs): a kernel may be placed while its
// predecessor still runs; it lets its own dependents be placed at once and waits for
// its predecessors to complete (and their writes to be visible) before anything else.
// Weight loads (never written by a kernel) may go between PDL_TRIGGER and PDL_WAIT.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define PDL_TRIGGER() asm volatile("griddepcontrol.launch_dependents;" ::: "memory")
#define PDL_WAIT() asm volatile("griddepcontrol.wait;" ::: "memory")
#else
#define PDL_TRIGGER()
#define PDL_WAIT()
#endif
#define PDL_START() \
    do {            \
        PDL_TRIGGER(); \
        PDL_WAIT();    \
    } while (0)
