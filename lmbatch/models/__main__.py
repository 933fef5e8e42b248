"""`python -m lmbatch.models NAME OUT_DIR`: write one of the built-in tiny models to a directory."""

import sys

from lmbatch.models.builtin import ARCHITECTURES, build_tiny_model

if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ARCHITECTURES:
        sys.exit(f"usage: python -m lmbatch.models {{{'|'.join(ARCHITECTURES)}}} OUT_DIR")
    print(build_tiny_model(sys.argv[2], sys.argv[1]))
