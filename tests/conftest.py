"""Spawns one gloo process group per TP size for the whole session and shares its results.

Importing torch and megatron-core costs ~4 s per process, so every multi-process check of a
TP size runs in the same spawn (tests/mp_checks.py) and the tests below only read numbers.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import checkpoint_checks  # noqa: E402
import gpt_checks  # noqa: E402
import mp_checks  # noqa: E402

SPAWN_TIMEOUT_S = 420


@pytest.fixture(scope="session")
def spawned():
    """spawned(tp) -> [mp_checks.LayerChecks of each rank], computed once per TP size."""
    from megatron_lora.cpu import spawn_gloo

    cache = {}

    def get(tp):
        if tp not in cache:
            try:
                cache[tp] = spawn_gloo(mp_checks.run_all, tp, timeout=SPAWN_TIMEOUT_S)
            except (RuntimeError, TimeoutError) as error:
                cache[tp] = error  # fail every dependent test at once, without re-spawning
        if isinstance(cache[tp], Exception):
            raise cache[tp]
        return cache[tp]

    return get


@pytest.fixture(scope="session")
def saved_adapters(tmp_path_factory):
    """(directory, [checkpoint_checks.SavedAdapters of each rank]): adapters saved at TP=2 + SP,
    and the broken copies."""
    from megatron_lora.cpu import spawn_gloo

    directory = tmp_path_factory.mktemp("adapters")
    try:
        results = spawn_gloo(checkpoint_checks.save_and_break, 2, args=(str(directory),),
                             timeout=SPAWN_TIMEOUT_S)
    except (RuntimeError, TimeoutError) as error:
        results = error
    return directory, results


@pytest.fixture(scope="session")
def saved(saved_adapters):
    directory, results = saved_adapters
    if isinstance(results, Exception):
        raise results
    return results


@pytest.fixture(scope="session")
def gpt_spawned(saved_adapters):
    """gpt_spawned(world) -> [gpt_checks.GptChecks of each rank]: every layout and variant of
    that world size, run once in one spawn (under PP each stage holds its own modules' part,
    and only the last stage the loss)."""
    from megatron_lora.cpu import spawn_gloo

    cache = {}

    def get(world):
        if world not in cache:
            try:
                cache[world] = spawn_gloo(gpt_checks.run_all, world,
                                          args=(str(saved_adapters[0]),), timeout=SPAWN_TIMEOUT_S)
            except (RuntimeError, TimeoutError) as error:
                cache[world] = error
        if isinstance(cache[world], Exception):
            raise cache[world]
        return cache[world]

    return get


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory):
    """The demo corpora (scripts/make_demo_data.py), made once for the script-running tests;
    read-only for them."""
    import subprocess

    directory = tmp_path_factory.mktemp("demo_data")
    subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "scripts"
                                        / "make_demo_data.py"), str(directory)],
                   check=True, capture_output=True, timeout=300)
    return directory
