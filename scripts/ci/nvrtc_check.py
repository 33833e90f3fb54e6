#!/usr/bin/env python3
"""NVRTC-compiles every CUDA kernel of ds4 (crates/cuda/kernels/*.cu) for sm_90a.

Uses libnvrtc from the `nvidia-cuda-nvrtc` wheel and headers from the
`nvidia-cuda-runtime` wheel, loaded with ctypes, so no CUDA toolkit or GPU is
needed. The options match what crates/cuda passes at run time (see
`ds4_cuda::compile::nvrtc_options`). Exit status: 0 all compiled, 1 a kernel
failed, 2 NVRTC not found.
"""
import ctypes
import glob
import os
import sys

ARCH = os.environ.get("DS4_NVRTC_ARCH", "sm_90a")


def find_nvrtc():
    roots = []
    try:
        import nvidia  # namespace package of the NVIDIA wheels

        roots += list(nvidia.__path__)
    except ImportError:
        pass
    for root in roots:
        libs = sorted(glob.glob(os.path.join(root, "cu*", "lib", "libnvrtc.so.*")))
        libs = [l for l in libs if "builtins" not in l and ".alt." not in l]
        if libs:
            inc = os.path.join(os.path.dirname(os.path.dirname(libs[0])), "include")
            return libs[0], inc
    return None, None


def main():
    lib_path, inc = find_nvrtc()
    if lib_path is None:
        print("nvrtc_check: SKIP: nvidia-cuda-nvrtc wheel not installed")
        return 2
    # libnvrtc dlopens its builtins library by soname: load it first, globally.
    for b in glob.glob(os.path.join(os.path.dirname(lib_path), "libnvrtc-builtins.so.*")):
        if ".alt." not in b:
            ctypes.CDLL(b, mode=ctypes.RTLD_GLOBAL)
    nvrtc = ctypes.CDLL(lib_path)
    major, minor = ctypes.c_int(), ctypes.c_int()
    nvrtc.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor))
    print(f"nvrtc_check: {lib_path} (NVRTC {major.value}.{minor.value}), arch {ARCH}")
    nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p
    here = os.path.dirname(os.path.abspath(__file__))
    kdir = os.path.join(here, "..", "..", "crates", "cuda", "kernels")
    files = sorted(glob.glob(os.path.join(kdir, "*.cu")))
    if not files:
        print("nvrtc_check: FAIL: no kernels found in", kdir)
        return 1
    # Headers (kernels/*.cuh) go to every program by name, as crates/cuda does.
    hdr_paths = sorted(glob.glob(os.path.join(kdir, "*.cuh")))
    hdr_srcs = (ctypes.c_char_p * max(len(hdr_paths), 1))(
        *[open(h, "rb").read() for h in hdr_paths])
    hdr_names = (ctypes.c_char_p * max(len(hdr_paths), 1))(
        *[os.path.basename(h).encode() for h in hdr_paths])
    failed = 0
    for path in files:
        name = os.path.basename(path)
        src = open(path, "rb").read()
        prog = ctypes.c_void_p()
        rc = nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src, name.encode(),
                                      len(hdr_paths), hdr_srcs, hdr_names)
        if rc != 0:
            print(f"  {name}: FAIL create: {nvrtc.nvrtcGetErrorString(rc).decode()}")
            failed += 1
            continue
        opts = [f"--gpu-architecture={ARCH}", "--std=c++17", "-default-device", "-lineinfo"]
        if os.path.isdir(inc):
            opts.append(f"-I{inc}")
        # e.g. DS4_NVRTC_EXTRA=--ptxas-options=-v prints registers and spills per kernel.
        opts += os.environ.get("DS4_NVRTC_EXTRA", "").split()
        arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
        rc = nvrtc.nvrtcCompileProgram(prog, len(opts), arr)
        log_size = ctypes.c_size_t()
        nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(log_size))
        log = ctypes.create_string_buffer(log_size.value)
        nvrtc.nvrtcGetProgramLog(prog, log)
        text = log.value.decode(errors="replace").strip()
        size = ctypes.c_size_t()
        if rc == 0:
            nvrtc.nvrtcGetCUBINSize(prog, ctypes.byref(size))
            print(f"  {name}: OK ({size.value} bytes of cubin)")
            dump = os.environ.get("DS4_NVRTC_DUMP")  # a folder: keep the cubins (nvdisasm)
            if dump:
                cubin = ctypes.create_string_buffer(size.value)
                nvrtc.nvrtcGetCUBIN(prog, cubin)
                with open(os.path.join(dump, name + ".cubin"), "wb") as f:
                    f.write(cubin.raw)
            if text:
                print("    " + text.replace("\n", "\n    "))
        else:
            print(f"  {name}: FAIL: {nvrtc.nvrtcGetErrorString(rc).decode()}\n{text}")
            failed += 1
        nvrtc.nvrtcDestroyProgram(ctypes.byref(prog))
    print(f"nvrtc_check: {len(files) - failed}/{len(files)} kernel files compiled")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
