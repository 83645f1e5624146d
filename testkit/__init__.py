"""Real throwaway servers and fakes of outside services, shared by the test
suite (``tests/``) and the benchmarks (``bench/``).

Nothing here imports Django or pytest: the tests wrap these in fixtures
(``tests/conftest.py``), the benchmarks use them as they are.
"""
