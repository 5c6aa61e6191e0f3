"""`python -m transduce.kernels`: build this machine's CPU kernels now (as `make install` does)."""
import logging
import sys

from transduce.kernels import build, build_dir, enabled

logging.basicConfig(level=logging.INFO, format="%(message)s")
if not enabled():
    print("TRANSDUCE_KERNELS is off: nothing to build")
    sys.exit(0)
try:
    print(f"kernels: {build()}")
except Exception as e:
    print(f"kernels: build failed in {build_dir()}: {e}\n"
          "inference will use PyTorch's ops (slower decoding); a C++ compiler (g++) and ninja are needed",
          file=sys.stderr)
    sys.exit(1)
