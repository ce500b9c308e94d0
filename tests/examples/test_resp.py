"""The RESP2 codec of examples/resp.py, on plain bytes and over a Connection."""

from __future__ import annotations

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st
from resp import INT64_MAX, INT64_MIN, NULL, ErrorReply, Null, Resp, RespValue, command

import triocomm
from triocomm.testing import connection_pair

line_text = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\r\n"),
    max_size=20,
)
scalars = (
    st.none()
    | st.integers(INT64_MIN, INT64_MAX)
    | st.binary(max_size=40)
    | line_text
    | st.builds(ErrorReply, line_text)
)
values = st.recursive(scalars, lambda children: st.lists(children, max_size=5), max_leaves=25)


def decode_all(codec: Resp, data: bytes) -> list[RespValue]:
    decoder = codec.decoder()
    out = decoder.feed(data)
    assert decoder.buffered == 0
    return out


# -- round trips ---------------------------------------------------------------


@given(values)
def test_every_value_round_trips(value: RespValue) -> None:
    codec = Resp()
    assert decode_all(codec, codec.encode(value)) == [value]


@given(st.lists(values, min_size=1, max_size=6), st.data())
@settings(max_examples=200)
def test_values_split_anywhere_decode_the_same(
    values_: list[RespValue], data: st.DataObject
) -> None:
    codec = Resp()
    wire = b"".join(codec.encode(v) for v in values_)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=8)))
    decoder = codec.decoder()
    out: list[RespValue] = []
    start = 0
    for cut in [*cuts, len(wire)]:
        out += decoder.feed(wire[start:cut])
        start = cut
        # Everything fed but not yet handed out is "buffered", including the
        # elements of an array that were consumed into a partial list.
        handed_out = sum(len(codec.encode(v)) for v in out)
        assert decoder.buffered == cut - handed_out
    assert out == values_
    assert decoder.buffered == 0


def test_byte_at_a_time_large_bulk_string() -> None:
    codec = Resp()
    payload = bytes(range(256)) * 64
    wire = codec.encode([b"SET", b"k", payload])
    decoder = codec.decoder()
    out: list[RespValue] = []
    for i in range(len(wire)):
        out += decoder.feed(wire[i : i + 1])
        if i < len(wire) - 1:
            assert not out
            assert decoder.buffered == i + 1
    assert out == [[b"SET", b"k", payload]]


# -- the wire format, byte for byte ----------------------------------------------


@pytest.mark.parametrize(
    ("value", "wire"),
    [
        ("OK", b"+OK\r\n"),
        (ErrorReply("ERR unknown command"), b"-ERR unknown command\r\n"),
        (0, b":0\r\n"),
        (-42, b":-42\r\n"),
        (INT64_MAX, b":9223372036854775807\r\n"),
        (b"hello", b"$5\r\nhello\r\n"),
        (b"", b"$0\r\n\r\n"),
        (b"a\r\nb", b"$4\r\na\r\nb\r\n"),
        (None, b"$-1\r\n"),
        ([], b"*0\r\n"),
        ([b"GET", b"k"], b"*2\r\n$3\r\nGET\r\n$1\r\nk\r\n"),
        ([1, [b"x", None], "OK"], b"*3\r\n:1\r\n*2\r\n$1\r\nx\r\n$-1\r\n+OK\r\n"),
    ],
)
def test_wire_format(value: RespValue, wire: bytes) -> None:
    codec = Resp()
    assert codec.encode(value) == wire
    assert decode_all(codec, wire) == [value]


def test_null_array_decodes_to_none() -> None:
    assert decode_all(Resp(), b"*-1\r\n*1\r\n*-1\r\n") == [None, [None]]


def test_command_builds_bulk_strings() -> None:
    assert command("SET", b"k\xff", 10, -1) == [b"SET", b"k\xff", b"10", b"-1"]
    assert Resp().encode(command("PING")) == b"*1\r\n$4\r\nPING\r\n"
    with pytest.raises(TypeError, match="float"):
        command("SET", "k", 1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="bool"):
        command("SET", "k", True)


def test_error_reply_code() -> None:
    assert ErrorReply("WRONGTYPE Operation against a key").code == "WRONGTYPE"
    assert ErrorReply("ERR").code == "ERR"


def test_bytearray_and_memoryview_encode_as_bulk_strings() -> None:
    codec = Resp()
    assert codec.encode([bytearray(b"ab"), memoryview(b"cd")]) == b"*2\r\n$2\r\nab\r\n$2\r\ncd\r\n"  # type: ignore[list-item]


def test_codec_is_immutable_and_hashable() -> None:
    assert Resp() == Resp()
    assert hash(Resp()) == hash(Resp())
    assert Resp(inline=True) != Resp()
    with pytest.raises(AttributeError):
        Resp().max_line = 1  # type: ignore[misc]


@pytest.mark.parametrize("field", ["max_message", "max_line", "max_items", "max_depth"])
@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_bounds_are_validated(field: str, bad: object) -> None:
    with pytest.raises(ValueError, match=field):
        Resp(**{field: bad})  # type: ignore[arg-type]


# -- encoding errors ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "error", "match"),
    [
        (True, TypeError, "boolean"),
        (1.5, TypeError, "float"),
        ({"a": 1}, TypeError, "dict"),
        ([b"ok", object()], TypeError, "object"),
        ("two\nlines", ValueError, "CR or LF"),
        (ErrorReply("bad\r"), ValueError, "CR or LF"),
        (INT64_MAX + 1, ValueError, "64-bit"),
        (INT64_MIN - 1, ValueError, "64-bit"),
    ],
)
def test_unencodable_values_raise_clear_errors(
    value: object, error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        Resp().encode(value)  # type: ignore[arg-type]


def test_encoding_respects_the_bounds() -> None:
    with pytest.raises(triocomm.FrameTooLarge) as info:
        Resp(max_message=10).encode(b"x" * 10)
    assert (info.value.size, info.value.limit) == (len(b"$10\r\n" + b"x" * 10 + b"\r\n"), 10)
    with pytest.raises(triocomm.FrameTooLarge, match="max_items"):
        Resp(max_items=3).encode([1, 2, 3])
    nested: RespValue = []
    for _ in range(3):
        nested = [nested]  # four arrays deep
    Resp(max_depth=4).encode(nested)
    with pytest.raises(ValueError, match="max_depth"):
        Resp(max_depth=3).encode(nested)


# -- malformed input -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("wire", "match"),
    [
        (b"?what\r\n", "unknown RESP type byte"),
        (b"PING\r\n", "unknown RESP type byte"),
        (b"\r\n", "empty RESP line"),
        (b"$abc\r\n", "malformed RESP bulk string length"),
        (b"$-2\r\n", "negative RESP bulk string length"),
        (b"*-5\r\n", "negative RESP array length"),
        (b"$ 3\r\nabc\r\n", "malformed"),
        (b"$+3\r\nabc\r\n", "malformed"),
        (b"$3\r\nabcd\r\n", "not followed by CRLF"),
        (b":1.5\r\n", "malformed RESP integer"),
        (b":\r\n", "malformed RESP integer"),
        (b":-\r\n", "malformed RESP integer"),
        (b":1_000\r\n", "malformed RESP integer"),
        (b":9223372036854775808\r\n", "does not fit in 64 bits"),
        (b":123456789012345678901\r\n", "malformed RESP integer"),
        (b"+caf\xe9\r\n", "not valid UTF-8"),
        (b"*2\r\n:1\r\n!\r\n", "unknown RESP type byte"),
    ],
)
def test_malformed_input_raises_protocol_error(wire: bytes, match: str) -> None:
    with pytest.raises(triocomm.ProtocolError, match=match):
        Resp().decoder().feed(wire)


def test_bulk_string_larger_than_max_message_fails_on_its_header() -> None:
    decoder = Resp(max_message=1000).decoder()
    # Only the header has arrived: nothing of the body is buffered yet.
    with pytest.raises(triocomm.FrameTooLarge) as info:
        decoder.feed(b"$1000\r\n")
    assert (info.value.size, info.value.limit) == (1000, 1000)
    # The largest body that fits with its header and CRLF is accepted.
    fits = Resp(max_message=1000).decoder()
    body = 1000 - len(b"$993\r\n") - 2
    assert fits.feed(b"$%d\r\n" % body + b"x" * body + b"\r\n") == [b"x" * body]


def test_max_message_counts_the_whole_array() -> None:
    decoder = Resp(max_message=64).decoder()
    with pytest.raises(triocomm.FrameTooLarge, match="max_message"):
        decoder.feed(b"*10\r\n" + b"$20\r\n" + b"y" * 20 + b"\r\n" + b"$30\r\n")
    decoder = Resp(max_message=64).decoder()
    with pytest.raises(triocomm.FrameTooLarge, match="max_message"):
        decoder.feed(b"*100\r\n" + b":12345678\r\n" * 10)


def test_array_announcing_too_many_items_fails_on_its_header() -> None:
    decoder = Resp(max_items=100).decoder()
    with pytest.raises(triocomm.FrameTooLarge, match="max_items"):
        decoder.feed(b"*100\r\n")  # the header itself plus 100 elements
    assert Resp(max_items=101).decoder().feed(b"*100\r\n" + b":1\r\n" * 100) == [[1] * 100]


def test_items_are_counted_across_nested_arrays() -> None:
    decoder = Resp(max_items=6).decoder()
    with pytest.raises(triocomm.FrameTooLarge, match="max_items"):
        decoder.feed(b"*2\r\n*2\r\n:1\r\n:2\r\n*2\r\n:3\r\n")


def test_items_are_counted_per_message() -> None:
    decoder = Resp(max_items=3).decoder()
    for _ in range(5):
        assert decoder.feed(b"*2\r\n:1\r\n:2\r\n") == [[1, 2]]


def test_nesting_deeper_than_max_depth_is_refused() -> None:
    assert Resp(max_depth=3).decoder().feed(b"*1\r\n*1\r\n*1\r\n:1\r\n") == [[[[1]]]]
    with pytest.raises(triocomm.ProtocolError, match="max_depth"):
        Resp(max_depth=3).decoder().feed(b"*1\r\n" * 4)
    with pytest.raises(triocomm.ProtocolError, match="max_depth"):
        Resp(max_depth=3).decoder().feed(b"*1\r\n" * 3 + b"*0\r\n")


def test_long_line_fails_as_soon_as_it_exceeds_max_line() -> None:
    decoder = Resp(max_line=10).decoder()
    # "+" plus nine characters, then a CR that may start the CRLF: still legal.
    assert decoder.feed(b"+abcdefghi\r") == []
    assert decoder.feed(b"\n") == ["abcdefghi"]
    assert decoder.feed(b"+abcdefghij") == []
    with pytest.raises(triocomm.FrameTooLarge) as info:
        decoder.feed(b"k")
    assert info.value.limit == 10


def test_a_crlf_split_across_feeds_is_found() -> None:
    decoder = Resp().decoder()
    assert decoder.feed(b"+OK\r") == []
    assert decoder.buffered == 4
    assert decoder.feed(b"\n:5") == ["OK"]
    assert decoder.feed(b"\r\n") == [5]


# -- inline commands (server side) -------------------------------------------------


def test_inline_commands_decode_to_word_lists() -> None:
    decoder = Resp(inline=True).decoder()
    assert decoder.feed(b"PING\r\n") == [[b"PING"]]
    assert decoder.feed(b"SET  key   value\r\n\r\nGET key\r\n") == [
        [b"SET", b"key", b"value"],
        [b"GET", b"key"],
    ]
    assert decoder.buffered == 0
    # RESP arrays still work, and an inline line is not allowed inside one.
    assert decoder.feed(b"*1\r\n$4\r\nPING\r\n") == [[b"PING"]]
    with pytest.raises(triocomm.ProtocolError, match="unknown RESP type byte"):
        decoder.feed(b"*1\r\nPING\r\n")


def test_inline_lines_are_bounded_too() -> None:
    decoder = Resp(inline=True, max_line=8).decoder()
    with pytest.raises(triocomm.FrameTooLarge):
        decoder.feed(b"x" * 20)


# -- over a Connection -----------------------------------------------------------------


async def test_values_cross_a_connection() -> None:
    left, right = connection_pair(Resp())
    async with left, right:
        sent: list[RespValue] = [command("SET", "k", "v"), "OK", None, 7, [b"a", [None]]]
        await left.send_many(sent)
        assert [await right.receive() for _ in sent] == sent


async def test_bad_bytes_break_the_connection() -> None:
    left, right = connection_pair(Resp())
    async with left, right:
        await left.stream.send_all(b"+OK\r\n")
        assert await right.receive() == "OK"
        await left.stream.send_all(b"%3\r\n")  # a RESP3 map: not RESP2
        with pytest.raises(triocomm.ProtocolError, match="unknown RESP type byte"):
            await right.receive()
        assert right.state is triocomm.ConnState.ERROR
        assert right.is_closed


async def test_peer_closing_inside_an_array_is_connection_lost() -> None:
    # The first element was consumed into a partial list, with no byte left in
    # the buffer: `buffered` must still report the unfinished message.
    left, right = connection_pair(Resp())
    async with right:
        await left.stream.send_all(b"*2\r\n:1\r\n")
        await left.aclose()
        with pytest.raises(triocomm.ConnectionLost, match="middle of a message"):
            with trio.fail_after(5):
                await right.receive()


def test_null_is_a_none_that_serve_does_not_skip() -> None:
    codec = Resp()
    assert codec.encode(NULL) == codec.encode(None) == b"$-1\r\n"
    assert codec.encode([NULL, b"x"]) == b"*2\r\n$-1\r\n$1\r\nx\r\n"  # type: ignore[list-item]
    assert Null() is NULL
    assert repr(NULL) == "NULL"
    assert decode_all(codec, codec.encode(NULL)) == [None]


@given(st.binary(max_size=200), st.booleans())
@settings(max_examples=300)
def test_garbage_raises_only_protocol_errors(data: bytes, inline: bool) -> None:
    decoder = Resp(max_message=500, max_line=50, max_items=20, max_depth=4, inline=inline).decoder()
    try:
        decoder.feed(data)
    except triocomm.ProtocolError:  # FrameTooLarge included
        pass


@given(values, st.data())
@settings(max_examples=300)
def test_corrupted_values_raise_only_protocol_errors(value: RespValue, data: st.DataObject) -> None:
    wire = bytearray(Resp().encode(value))
    position = data.draw(st.integers(0, len(wire) - 1))
    wire[position] = data.draw(st.integers(0, 255))
    decoder = Resp(max_message=4096, max_items=200).decoder()
    chunks = data.draw(st.integers(1, 4))
    step = max(1, len(wire) // chunks)
    try:
        for start in range(0, len(wire), step):
            decoder.feed(bytes(wire[start : start + step]))
    except triocomm.ProtocolError:
        pass
