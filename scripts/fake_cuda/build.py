"""Builds the fake CUDA driver (fake_cuda.cpp) and the emulator libraries of every kernel file,
and prints the environment that makes a program load them instead of a GPU's driver:

    eval "$(python3 scripts/fake_cuda/build.py)"   # sets LD_LIBRARY_PATH, ARBOR_FAKE_CUDA_KERNELS
    target/debug/deps/cuda-... --test-threads 1    # arbor's GPU tests, on the CPU

Needs g++ and numpy (as scripts/kernel_emu), and NVRTC (the nvidia-cuda-nvrtc wheel): arbor
compiles its kernels with the real NVRTC, and the fake checks each launched kernel against the
PTX. Set EMU_OPT=-O2 for faster kernels at a longer build.
"""

import glob
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "kernel_emu"))
import emu  # noqa: E402

OUT = os.path.join(emu.ROOT, "target", "fake-cuda")


def main():
    libs = [emu._build(os.path.basename(p)[:-3])
            for p in sorted(glob.glob(os.path.join(emu.KERNELS, "*.cu")))]
    os.makedirs(OUT, exist_ok=True)
    src = os.path.join(HERE, "fake_cuda.cpp")
    lib = os.path.join(OUT, "libcuda.so.1")
    if not os.path.exists(lib) or os.path.getmtime(lib) < os.path.getmtime(src):
        r = subprocess.run(["g++", "-std=c++17", "-O2", "-g", "-fPIC", "-shared",
                            "-fvisibility=hidden", "-o", lib + ".tmp", src, "-ldl"],
                           capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"compiling {src}:\n{r.stderr[-6000:]}")
        os.replace(lib + ".tmp", lib)
    for name in ["libcuda.so", "libcublasLt.so", "libcublasLt.so.13"]:
        link = os.path.join(OUT, name)
        if os.path.lexists(link):
            os.remove(link)
        os.symlink("libcuda.so.1", link)
    path = os.environ.get("LD_LIBRARY_PATH", "")
    print(f"export LD_LIBRARY_PATH={OUT}{':' + path if path else ''}")
    print(f"export ARBOR_CUDA_LIB={OUT}")
    print(f"export ARBOR_FAKE_CUDA_KERNELS={':'.join(libs)}")


if __name__ == "__main__":
    main()
