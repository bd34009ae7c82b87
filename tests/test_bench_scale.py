"""bench.scale's admission figures: the closed-loop model its measured shares are printed
against, and the vLLM series the measured shares come from."""

from __future__ import annotations

import inspect

from bench.scale import CLIENTS, MAX_LORAS, Traffic, _engine_seconds, closed_loop_share, slot_bound


def test_traffic_on_as_many_adapters_as_slots_always_runs():
    assert closed_loop_share(MAX_LORAS, strict=False) == 1.0
    assert closed_loop_share(MAX_LORAS, strict=True) == 1.0


def test_a_closed_loop_runs_under_the_fresh_draw_bound_and_strict_order_under_that():
    # The requests left waiting are those whose adapters found no slot; their clients stay stuck
    # while the served ones come back, mostly to hot adapters. Strict order also stops the hot
    # requests queued behind a cold one.
    aware, strict = closed_loop_share(1000, strict=False), closed_loop_share(1000, strict=True)
    assert strict < aware < slot_bound(1000) < slot_bound(1000, best=True)
    assert 1.1 < aware / strict < 1.6, (aware, strict)
    assert 16 / CLIENTS < strict  # more than one request per slot: hot adapters share theirs


def test_share_is_seconds_run_over_seconds_in_the_engine():
    traffic = Traffic(srv=None, names=["a"], refs={})
    traffic.queued_s, traffic.running_s = 3.0, 1.0
    assert traffic.share() == 0.25


def test_the_engine_series_are_vllms():
    from vllm.v1.metrics import loggers

    source = inspect.getsource(loggers)
    names = inspect.getsource(_engine_seconds)
    for series in ("vllm:request_queue_time_seconds", "vllm:request_inference_time_seconds"):
        assert f'"{series}"' in source, series
        assert f'"{series}_sum"' in names, series
