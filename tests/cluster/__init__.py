"""Tests against a throwaway real Slurm cluster (see slurm_harness.py)."""
