"""Tokenise a corpus into a megatron indexed dataset (= mg-preprocess)."""

import sys

from megatron_grouter.offline.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
