"""megatron-grouter's tests: a package, so helpers are imported as `tests.<dir>.<module>` from the repository root
(pytest.ini: pythonpath = .; subprocesses get the root on PYTHONPATH, see tests/train_runs.py:repo_env)."""
