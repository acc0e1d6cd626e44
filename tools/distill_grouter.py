"""Distil a Grouter from a trained MoE's first-MoE-layer router (= mg-distill)."""

from megatron_grouter.offline.distill import main

if __name__ == "__main__":
    main()
