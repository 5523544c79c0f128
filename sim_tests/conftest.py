"""pytest glue for the simulations: collects what the cocotb tests report into the summary."""

import pytest

_REPORT = pytest.StashKey[dict]()


def pytest_configure(config):
    config.stash[_REPORT] = {}


@pytest.fixture
def sim_report(request):
    """A list the test extends with report lines; they are printed under its node id at the end."""
    return request.config.stash[_REPORT].setdefault(request.node.nodeid, [])


def pytest_terminal_summary(terminalreporter, config):
    reports = {node: lines for node, lines in config.stash[_REPORT].items() if lines}
    if reports:
        terminalreporter.section("simulation report")
        for node, lines in reports.items():
            terminalreporter.write_line(node)
            for line in lines:
                terminalreporter.write_line(f"    {line}")
