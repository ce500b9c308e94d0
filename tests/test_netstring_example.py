"""The netstring codec of the framing guide (examples/netstring.py) does what the guide says.

The guide presents it as a complete, correct codec, so it is held to the same
properties as the built-in ones: any split decodes to the messages, garbage
raises only ProtocolError, the decoder stays bounded and fails fast.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import triocomm

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "netstring.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("netstring_example", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look the module up by name while the class is being made.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


netstring = load_example()
Netstring: Any = netstring.Netstring
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def feed_all(decoder: Any, chunks: list[bytes]) -> list[bytes]:
    out: list[bytes] = []
    for chunk in chunks:
        out.extend(decoder.feed(chunk))
    return out


def test_wire_format() -> None:
    codec = Netstring()
    assert codec.encode(b"hello") == b"5:hello,"
    assert codec.encode(b"") == b"0:,"
    assert codec.encode(memoryview(b"a,b")) == b"3:a,b,"
    assert codec.decoder().feed(b"5:hello,0:,3:a,b,") == [b"hello", b"", b"a,b"]


def test_encode_refuses_what_it_cannot_send() -> None:
    codec = Netstring(max_size=3)
    with pytest.raises(TypeError, match="not str"):
        codec.encode("text")
    with pytest.raises(triocomm.FrameTooLarge) as info:
        codec.encode(b"four")
    assert (info.value.size, info.value.limit) == (4, 3)
    with pytest.raises(ValueError, match="max_size"):
        Netstring(max_size=-1)


def test_codec_is_an_immutable_value() -> None:
    assert Netstring() == Netstring()
    assert hash(Netstring(10)) == hash(Netstring(10))
    assert Netstring(10) != Netstring(11)


def test_payload_in_many_pieces_is_kept_and_counted() -> None:
    decoder = Netstring().decoder()
    assert decoder.feed(b"10:") == []
    assert decoder.buffered == 3
    assert decoder.feed(b"01234") == []
    assert decoder.feed(b"56789") == []
    assert decoder.buffered == 13
    assert decoder.feed(b",2:") == [b"0123456789"]
    assert decoder.buffered == 2


async def test_peer_closing_after_a_header_is_connection_lost() -> None:
    # The header alone starts a message: buffered must say so, or the
    # connection would take this close for a clean end of stream.
    left, right = trio.testing.memory_stream_pair()
    server = triocomm.Connection(right, Netstring())
    await left.send_all(b"10:")
    await left.aclose()
    with pytest.raises(triocomm.ConnectionLost):
        await server.receive()


@pytest.mark.parametrize(
    "garbage",
    [b"x:", b"05:hello,", b":", b"-1:", b"5:hello!", b"1:ab", b"2 :ab,", b"+3:abc,"],
)
def test_bad_input_is_a_protocol_error(garbage: bytes) -> None:
    with pytest.raises(triocomm.ProtocolError):
        Netstring().decoder().feed(garbage)


def test_oversized_length_fails_before_the_payload() -> None:
    decoder = Netstring(max_size=100).decoder()
    with pytest.raises(triocomm.FrameTooLarge) as info:
        decoder.feed(b"101:")
    assert (info.value.size, info.value.limit) == (101, 100)


def test_too_many_digits_fail_before_the_colon() -> None:
    decoder = Netstring(max_size=100).decoder()
    assert decoder.feed(b"99") == []
    with pytest.raises(triocomm.FrameTooLarge):
        decoder.feed(b"99")  # "9999" cannot be <= 100, colon or not


@SETTINGS
@given(messages=st.lists(st.binary(max_size=200), max_size=20), cuts=st.lists(st.integers(0, 5000)))
def test_any_split_yields_the_messages(messages: list[bytes], cuts: list[int]) -> None:
    codec = Netstring(max_size=200)
    stream = b"".join(codec.encode(m) for m in messages)
    points = sorted({min(c, len(stream)) for c in cuts})
    chunks = [stream[a:b] for a, b in zip([0, *points], [*points, len(stream)], strict=True)]
    decoder = codec.decoder()
    assert feed_all(decoder, chunks) == messages
    assert decoder.buffered == 0


@SETTINGS
@given(
    chunks=st.lists(
        st.one_of(st.binary(max_size=60), st.sampled_from([b"1", b"0", b":", b",", b"12:"])),
        max_size=40,
    ),
    max_size=st.integers(0, 50),
)
def test_garbage_raises_only_protocol_errors_and_stays_bounded(
    chunks: list[bytes], max_size: int
) -> None:
    decoder = Netstring(max_size=max_size).decoder()
    bound = len(str(max_size)) + 1 + max_size + 1
    for chunk in chunks:
        try:
            decoder.feed(chunk)
        except triocomm.ProtocolError:
            return
        assert decoder.buffered <= bound


async def test_it_drives_a_connection() -> None:
    left, right = trio.testing.memory_stream_pair()
    codec = Netstring(max_size=64)
    client, server = triocomm.Connection(left, codec), triocomm.Connection(right, codec)
    await client.send_many([b"one", b"two, with a comma"])
    assert await server.receive() == b"one"
    assert await server.receive() == b"two, with a comma"
    await left.send_all(b"65:")
    with pytest.raises(triocomm.FrameTooLarge):
        await server.receive()
    assert server.state is triocomm.ConnState.ERROR


def test_the_example_runs() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=30, check=True
    )
    assert result.stdout.splitlines() == ["b'hello'", "b''", "b'netstrings, with commas,'"]
