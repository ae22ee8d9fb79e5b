"""The seen store on the real directory database: each channel id is new exactly once,
however many webhooks race on it, and a caller that gives up leaves no mark behind."""

import asyncio

from sqlalchemy.ext.asyncio import AsyncEngine

from routers.store.connector_state import DbSeenStore
from tests.support.waiting import until


async def test_concurrent_callers_each_learn_whether_their_own_id_was_new(
    engine: AsyncEngine,
) -> None:
    """Calls made together are written in one transaction; an id given twice (a Twilio
    retry racing the original) is new for exactly one caller, on any channel."""
    store = DbSeenStore(engine)
    assert await store.first_time("sms", "SM-old")
    ids = [f"SM{i}" for i in range(40)] + [f"SM{i}" for i in range(0, 40, 4)] + ["SM-old"]
    answers = await asyncio.gather(
        *(store.first_time("sms", i) for i in ids), store.first_time("voice", "SM1")
    )
    new = [i for i, fresh in zip(ids, answers, strict=False) if fresh]
    assert sorted(new) == sorted(f"SM{i}" for i in range(40))
    assert answers[-1] is True, "channels are separate"
    assert not await store.first_time("sms", "SM7")


async def test_a_caller_that_gives_up_leaves_its_id_unmarked(engine: AsyncEngine) -> None:
    """A webhook cancelled while its id was being recorded publishes nothing: its retry
    must be taken as new, not dropped as a duplicate."""
    store = DbSeenStore(engine)
    first = asyncio.create_task(store.first_time("sms", "SM-busy"))
    gives_up = asyncio.create_task(store.first_time("sms", "SM-cancelled"))
    await asyncio.sleep(0)
    gives_up.cancel()
    assert await first
    # the writer unmarks it right after its transaction
    await until(lambda: store.first_time("sms", "SM-cancelled"), 10, "SM-cancelled unmarked")
