"""`python -m mora.kernels.native`: build the native CPU kernel ahead of time and say where it is."""

from __future__ import annotations

import sys

from mora.kernels.native import build, native_status

if __name__ == "__main__":
    if "--if-supported" in sys.argv[1:]:  # images and installs: where it cannot be used (not x86-64), say why
        print(native_status()[1])
    else:
        print(build(verbose="-v" in sys.argv[1:]))
