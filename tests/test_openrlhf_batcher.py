"""The rollout actor's batcher: a step's samples, sent by OpenRLHF one prompt RPC at a time, start as one batch.

On an H200 the four `generate_responses` RPCs of a 4-prompt step arrived over 85-230 ms and the old fixed 20 ms window
split every rollout into two batches run one after another (bench/results/NOTES.md, session 9)."""

from __future__ import annotations

import asyncio

import pytest

from sparrow_sgl.openrlhf.batcher import Batcher


def _run(batcher_kwargs: dict, arrivals: list[tuple[float, int, tuple]]) -> tuple[list[int], float]:
    """Submit `count` requests of `key` at each (delay_s, count, key); returns the batch sizes run and the seconds
    from the first arrival to the first batch's start."""
    sizes: list[int] = []
    starts: list[float] = []

    def run_batch(prompts, params):
        starts.append(loop.time())
        sizes.append(len(prompts))
        return [p[0] for p in prompts]

    async def main():
        batcher = Batcher(run_batch, **batcher_kwargs)

        async def group(delay, count, key):
            await asyncio.sleep(delay)
            return await asyncio.gather(*(batcher.submit([i], None, key) for i in range(count)))

        t0 = loop.time()
        results = await asyncio.gather(*(group(*a) for a in arrivals))
        assert [len(r) for r in results] == [count for _, count, _ in arrivals]  # every request answered
        return starts[0] - t0

    loop = asyncio.new_event_loop()
    try:
        first_start = loop.run_until_complete(main())
    finally:
        loop.close()
    return sizes, first_start


STEP = [(0.0, 8, "a"), (0.0, 8, "a"), (0.08, 8, "a"), (0.15, 8, "a")]  # the RPC spread seen on the H200


def test_a_step_whose_prompts_arrive_over_150_ms_runs_as_one_batch():
    sizes, first = _run({"expect": 32, "quiet_s": 0.05, "max_wait_s": 1.0}, STEP)
    assert sizes == [32] and first < 0.5  # started on the 32nd request, not after max_wait_s
    assert _run({"quiet_s": 0.1, "max_wait_s": 1.0}, STEP)[0] == [32]  # no expect: the quiet window


def test_an_engine_given_one_prompt_fewer_starts_after_the_quiet_window():
    sizes, first = _run({"expect": 16, "expect_min": 8, "quiet_s": 0.05, "max_wait_s": 2.0}, [(0.0, 8, "a")])
    assert sizes == [8] and first < 1.0


def test_fewer_requests_than_expected_start_at_max_wait():
    sizes, first = _run({"expect": 32, "quiet_s": 0.05, "max_wait_s": 0.3}, [(0.0, 8, "a")])
    assert sizes == [8] and 0.25 <= first < 1.5


def test_requests_of_other_sampling_settings_run_in_their_own_batch():
    sizes, _ = _run({"quiet_s": 0.05, "max_wait_s": 0.5}, [(0.0, 4, "a"), (0.0, 3, "b"), (0.01, 2, "a")])
    assert sorted(sizes) == [3, 6]


@pytest.mark.parametrize("kwargs", [{"expect": -1}, {"expect": 8, "expect_min": 9}, {"expect_min": 4},
                                    {"quiet_s": 0.0}, {"quiet_s": 3.0, "max_wait_s": 2.0}])
def test_bad_batcher_settings_are_refused(kwargs):
    with pytest.raises(ValueError, match="Batcher needs"):
        Batcher(lambda prompts, params: [], **kwargs)


def test_samples_per_engine_follows_openrlhfs_balancing():
    pytest.importorskip("ray")
    from sparrow_sgl.openrlhf.factory import samples_per_engine

    assert samples_per_engine(4, 8, 1) == (32, 32)
    assert samples_per_engine(4, 8, 3) == (8, 16)
    assert samples_per_engine(2, 8, 4) == (0, 8)
