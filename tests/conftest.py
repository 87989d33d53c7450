# pytest puts this folder on sys.path (rootdir-relative imports), so the tests import
# helpers.py, adaptive_reference.py and distributed_cases.py as plain modules.


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: takes more than ~30 s; runs in `make test` (CI); skip locally with -m 'not slow'"
    )
