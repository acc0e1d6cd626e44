"""python -m megatron_grouter.reproduce experiment=quick  (= mg-reproduce)."""

import sys

from megatron_grouter.reproduce.cli import main

if __name__ == "__main__":
    sys.exit(main())
