"""Admission control without sockets: places, a bounded first-come-first-served line, refusals."""

import asyncio

import pytest

from router.admission import Admission, Overloaded


def test_places_then_a_bounded_line_then_refusal():
    async def scenario():
        admission = Admission(max_running=2, max_waiting=2)
        first, second = admission.enter(), admission.enter()
        assert first.holds_place and second.holds_place
        third, fourth = admission.enter(), admission.enter()
        assert not third.holds_place and (admission.running, admission.waiting) == (2, 2)
        with pytest.raises(Overloaded) as refused:
            admission.enter()
        assert "2 requests running and 2 waiting" in str(refused.value)
        assert "(--max-concurrent-requests 2, --max-waiting 2)" in str(refused.value)
        first.leave()  # the first in line gets the place
        await asyncio.wait_for(third.admitted(), 1)
        assert not fourth.holds_place and (admission.running, admission.waiting) == (2, 1)
        first.leave()  # leaving twice changes nothing
        assert (admission.running, admission.waiting) == (2, 1)
        for ticket in (second, third, fourth):
            ticket.leave()
        assert (admission.running, admission.waiting) == (0, 0)

    asyncio.run(scenario())


def test_a_request_cancelled_in_line_leaves_it_and_a_place_handed_over_is_passed_on():
    async def scenario():
        admission = Admission(max_running=1, max_waiting=3)
        holder = admission.enter()
        cancelled, handed, last = admission.enter(), admission.enter(), admission.enter()
        task = asyncio.create_task(cancelled.admitted())
        await asyncio.sleep(0)
        task.cancel()  # its client went away while it waited
        with pytest.raises(asyncio.CancelledError):
            await task
        cancelled.leave()
        assert admission.waiting == 2
        holder.leave()  # the place goes to `handed`, the first still waiting
        assert handed.holds_place and not last.holds_place
        handed.leave()  # its caller left before running: the place goes on to `last`
        await asyncio.wait_for(last.admitted(), 1)
        last.leave()
        assert (admission.running, admission.waiting) == (0, 0)
        no_line = Admission(max_running=1, max_waiting=0)
        no_line.enter()
        with pytest.raises(Overloaded):
            no_line.enter()

    asyncio.run(scenario())
