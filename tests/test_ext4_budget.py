"""Issue 14 item 13: the in-memory ext4 models of concurrent conversions (an index converts up to 4 children
at once) share one process-wide inode budget; a reservation past it waits while another model makes
progress, and never deadlocks."""

from __future__ import annotations

import io
import threading
import time

from converter.ext4 import ImageBuilder, RawDisk
from converter.ext4 import budget as budget_mod
from converter.ext4.budget import STEP, ModelBudget
from tests.harness import layers as L


def wait_until(condition, what: str) -> None:
    """Synchronise with another thread (not a timing assertion: the bound only stops a hung test)."""
    deadline = time.monotonic() + 30
    while not condition():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.01)


class Model:
    """Stands for a Filesystem: something the budget can hold a weak reference to."""


def test_a_model_alone_never_waits_even_past_the_limit() -> None:
    budget = ModelBudget(limit=100)
    model = Model()
    key = budget.register(model)
    budget.applying(key, True)
    budget.reserve(key, 1000)
    assert budget.total == 1000 and budget.waits == 0


def test_a_reservation_past_the_limit_waits_for_the_running_model_and_then_proceeds() -> None:
    budget = ModelBudget(limit=100)
    a, b = Model(), Model()
    key_a, key_b = budget.register(a), budget.register(b)
    budget.applying(key_a, True)
    budget.applying(key_b, True)
    budget.reserve(key_a, 80)
    done = threading.Event()

    def grow_b() -> None:
        budget.reserve(key_b, 50)
        done.set()

    thread = threading.Thread(target=grow_b)
    thread.start()
    wait_until(lambda: budget.waits == 1, "b waits")
    assert not done.is_set() and budget.total == 80
    budget.applying(key_a, False)  # a's layer ends: it no longer makes progress, b may go on
    thread.join(30)
    assert done.is_set() and budget.total == 130


def test_memory_given_back_lets_a_waiter_in_within_the_limit() -> None:
    budget = ModelBudget(limit=100)
    a, b = Model(), Model()
    key_a, key_b = budget.register(a), budget.register(b)
    for key in (key_a, key_b):
        budget.applying(key, True)
    budget.reserve(key_a, 90)
    thread = threading.Thread(target=budget.reserve, args=(key_b, 50))
    thread.start()
    wait_until(lambda: budget.waits == 1, "b waits")
    del a  # the model is dropped: its reservation goes with it
    thread.join(30)
    assert not thread.is_alive() and budget.total == 50


def test_models_that_all_wait_do_not_deadlock() -> None:
    budget = ModelBudget(limit=100)
    models = [Model() for _ in range(4)]
    keys = [budget.register(m) for m in models]
    for key in keys:
        budget.applying(key, True)
        budget.reserve(key, 25)
    def grow_then_end_layer(key: int) -> None:
        budget.reserve(key, 50)
        budget.applying(key, False)

    threads = [threading.Thread(target=grow_then_end_layer, args=(key,)) for key in keys]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not any(t.is_alive() for t in threads)
    assert budget.total == 300 and budget.waits >= 1  # all four went on, one at a time past the limit


def test_concurrent_builders_share_the_budget_and_finish(tmp_path, monkeypatch) -> None:
    shared = ModelBudget(limit=2 * STEP)
    monkeypatch.setattr("converter.ext4.fs.MODEL_BUDGET", shared)
    files = 3 * STEP  # each model alone is larger than the whole budget
    layer = L.make_tar([L.file(f"d{i // 1000}/f{i}") for i in range(files)], format="ustar")
    errors: list[BaseException] = []

    def build(k: int) -> None:
        try:
            with RawDisk(tmp_path / f"disk{k}.raw", 1 << 30) as raw:
                stats = ImageBuilder(1 << 30).apply_layer(io.BytesIO(layer), raw, label=str(k))
                assert stats.files == files
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=build, args=(k,)) for k in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    assert not errors and not any(t.is_alive() for t in threads)
    largest = files + STEP  # one model's reservation, rounded up to a step (plus its directories)
    assert shared.peak <= shared.limit + largest + STEP
    assert budget_mod.MODEL_BUDGET is not shared  # the process-wide budget itself was not replaced
