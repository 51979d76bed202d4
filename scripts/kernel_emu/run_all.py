"""Every kernel check on the CPU emulator (see emu.py); exits non-zero on the first failure.
Run by crates/arbor-kernels/tests/cuda/emulator.rs, or by hand:
    python3 scripts/kernel_emu/run_all.py
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import check_attention  # noqa: E402
import check_cascade  # noqa: E402
import check_elementwise  # noqa: E402
import check_kv  # noqa: E402
import check_moe  # noqa: E402
import check_qkv  # noqa: E402
import check_sparse  # noqa: E402

CHECKS = [("attention.cu", check_attention), ("cascade.cu", check_cascade),
          ("moe.cu", check_moe), ("qkv.cu", check_qkv), ("kv.cu", check_kv),
          ("norm.cu, embedding.cu, activation.cu", check_elementwise),
          ("sparse.cu", check_sparse)]

if __name__ == "__main__":
    for name, mod in CHECKS:
        t0 = time.time()
        worst = mod.main()
        print(f"== {name}: ok, worst nmse {worst:.2e}, {time.time() - t0:.1f} s", flush=True)
