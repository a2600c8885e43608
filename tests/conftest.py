"""Suite-wide guard: a default run (`make test`, no paths named) must collect every
`tests/**/test_*.py`. pytest silently skips some folder names (`dist`, `build`, dotted
ones) and a file that fails to be a module is easy to miss; a test CI never runs protects
nothing, so such a run stops with the list of files it did not collect."""
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
_collected: set[Path] = set()


def pytest_collectreport(report):
    path = getattr(report, "fspath", None)
    if path and str(path).endswith(".py"):
        _collected.add(Path(str(path)).resolve())


def _is_default_run(config) -> bool:
    named = [a for a in config.invocation_params.args if not str(a).startswith("-")]
    return not named and not config.getoption("keyword") and not config.getoption("markexpr")


def pytest_collection_finish(session):
    if not _is_default_run(session.config):
        return
    missing = sorted(p for p in TESTS.rglob("test_*.py") if p.resolve() not in _collected)
    if missing:
        names = "\n  ".join(str(p.relative_to(TESTS.parent)) for p in missing)
        raise pytest.UsageError(
            f"these test files were not collected by the default run:\n  {names}\n"
            "rename the folder (pytest skips `dist`, `build` and dotted names) or fix the file")


@pytest.fixture
def native_kernels():
    """The native kernels, built: a C compiler is part of the test set-up, so a failed build
    fails the tests that need it rather than skipping them."""
    from dsmoe import kernels
    if not kernels.available():
        pytest.fail("the native kernels did not build: a C compiler is part of the test set-up")
