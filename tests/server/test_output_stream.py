"""OutputStream: what was put comes out in order, all at once, to a reader that waits for it."""

from __future__ import annotations

import asyncio

import pytest

from server.output_stream import OutputStream


def test_items_come_out_in_order_and_all_at_once():
    async def main():
        stream = OutputStream()
        for i in range(3):
            stream.put(i)
        first = await stream.take_all()
        reader = asyncio.ensure_future(stream.take_all())
        await asyncio.sleep(0)
        assert not reader.done()  # nothing waiting: the reader waits
        stream.put(3)
        stream.put(4)  # (put before the reader runs again: it takes both)
        return first, await reader, len(stream)

    assert asyncio.run(main()) == ([0, 1, 2], [3, 4], 0)


def test_a_cancelled_reader_leaves_the_stream_usable():
    async def main():
        stream = OutputStream()
        reader = asyncio.ensure_future(stream.take_all())
        await asyncio.sleep(0)
        reader.cancel()
        with pytest.raises(asyncio.CancelledError):
            await reader
        stream.put("kept")  # no waiter to wake: the item waits
        return await asyncio.wait_for(stream.take_all(), 1)

    assert asyncio.run(main()) == ["kept"]
