"""The router's pool (:mod:`kvplane.router.pool`): a backend's load is its last /metrics
corrected by what the router saw finish since."""

from __future__ import annotations

from kvplane.router.pool import BackendSpec, Pool
from kvplane.router.scoring import Load

URL = "http://127.0.0.1:1"


def pool_with_one() -> Pool:
    pool = Pool(eject_after=3)
    pool.add(BackendSpec(URL, "a"), from_flag=True)
    pool.check_answered(URL, Load(running=0), ["m"])
    return pool


def test_requests_finished_since_the_last_metrics_no_longer_count() -> None:
    pool = pool_with_one()
    for _ in range(3):
        pool.started(URL)
    pool.check_answered(URL, Load(running=2, waiting=1, kv_usage=0.5), None)
    b = pool.backends[URL]
    assert b.current_load == Load(2, 1, 0.5, 3)
    pool.finished(URL)
    pool.finished(URL)
    # two done: the snapshot's 3 ahead become 1 (running first, then waiting)
    assert b.current_load == Load(0, 1, 0.5, 1)
    assert b.current_load.ahead == 1
    pool.finished(URL)
    assert b.current_load.ahead == 0
    # a fresh snapshot replaces the correction
    pool.check_answered(URL, Load(running=1), None)
    assert b.current_load == Load(1, 0, 0.0, 0)


def test_other_clients_requests_still_count() -> None:
    pool = pool_with_one()
    pool.started(URL)
    pool.check_answered(URL, Load(running=4), None)  # three from elsewhere
    assert pool.backends[URL].current_load.ahead == 4
    pool.finished(URL)
    assert pool.backends[URL].current_load.ahead == 3
    # a check without a /metrics answer keeps the snapshot and its correction
    pool.check_answered(URL, None, None)
    assert pool.backends[URL].current_load.ahead == 3
