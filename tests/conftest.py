"""Shared fixtures: the `device` parametrisation, per-test seeds, and a report section."""

from __future__ import annotations

import zlib

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()

_REPORT_KEY = pytest.StashKey[list]()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    # Every test taking `device` runs on CPU, and on CUDA when a GPU is visible (else skipped with
    # the reason), so the same suite checks the CUDA kernels on a GPU machine.
    if "device" in metafunc.fixturenames:
        metafunc.parametrize(
            "device",
            [
                "cpu",
                pytest.param(
                    "cuda",
                    marks=[
                        pytest.mark.cuda,
                        pytest.mark.skipif(not HAS_CUDA, reason="no CUDA device"),
                    ],
                ),
            ],
        )


@pytest.fixture(autouse=True, scope="session")
def _private_cost_tables(tmp_path_factory):
    """Cost tables (policy="cost", the default, measures one per setup) go to a folder of this
    test session, never the user's cache: tests see no table an earlier run or a benchmark left."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLASP_COST_TABLES", str(tmp_path_factory.mktemp("cost_tables")))
        yield


# What the default policy="cost" reads in tests that do not measure: verify flat, draft steps
# nearly free (a GPU at batch 1), so rounds draft and tests of drafting do not depend on how fast
# this machine ran a tiny model's calibration. Tests of the measurement itself are marked
# `measured_cost_table` and calibrate for real.
SYNTHETIC_COST_TABLE = {"verify_s": {1: 1.0, 32: 1.0}, "draft_step_s": 0.05, "dp_s": 0.1}


@pytest.fixture(autouse=True)
def _deterministic_cost_table(request, monkeypatch):
    if request.node.get_closest_marker("measured_cost_table"):
        return
    from clasp_ext.decoding import batch
    from clasp_ext.decoding.cost_model import CostTable

    def synthetic(*args, **kwargs):
        return CostTable(**SYNTHETIC_COST_TABLE)

    monkeypatch.setattr(batch, "get_cost_table", synthetic)  # the loop's one measuring call


@pytest.fixture(autouse=True)
def _fixed_seed(request: pytest.FixtureRequest) -> int:
    """Seeds torch from the test's id: fixed per test, independent of test order."""
    seed = zlib.crc32(request.node.nodeid.encode())
    torch.manual_seed(seed)
    return seed


@pytest.fixture
def report(request: pytest.FixtureRequest):
    """`report(line)`: prints the line and repeats it in the terminal summary."""
    lines = request.config.stash.setdefault(_REPORT_KEY, [])

    def add(line: str) -> None:
        print(line)
        lines.append(line)

    return add


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    lines = config.stash.get(_REPORT_KEY, [])
    if lines:
        terminalreporter.section("clasp_ext measurements")
        for line in lines:
            terminalreporter.write_line(line)
