"""The built-in codecs on plain bytes: exact wire layout, bounds, errors, properties.

No I/O here: framing is sans-I/O, so every behaviour is checked by feeding
bytes to a decoder. The hypothesis properties are the heart of it: any list of
messages, split anywhere, decodes to exactly those messages; arbitrary bytes
raise only the documented errors; a decoder holds no more than its bound.
"""

from __future__ import annotations

import dataclasses
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from triocomm import FrameTooLarge, LengthPrefixed, Lines, ProtocolError, Raw

HEADERS = ["!B", "!H", "!I", "!Q", ">I", "<H", "<I", "<Q"]


def feed_all(decoder: Any, chunks: list[bytes]) -> list[bytes]:
    out: list[bytes] = []
    for chunk in chunks:
        out.extend(decoder.feed(chunk))
    return out


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    """Cut ``data`` at the given offsets (any order, duplicates allowed)."""
    points = sorted({min(max(c, 0), len(data)) for c in cuts})
    chunks, start = [], 0
    for point in points:
        chunks.append(data[start:point])
        start = point
    chunks.append(data[start:])
    return chunks


# -- LengthPrefixed ------------------------------------------------------------


@pytest.mark.parametrize("header", HEADERS)
def test_length_prefixed_wire_layout(header: str) -> None:
    codec = LengthPrefixed(header=header)
    encoded = bytes(codec.encode(b"hello"))
    assert encoded == struct.pack(header, 5) + b"hello"
    assert codec.header_size == struct.calcsize(header)
    assert codec.decoder().feed(encoded) == [b"hello"]


def test_length_prefixed_default_is_four_byte_big_endian() -> None:
    assert LengthPrefixed().encode(b"ab") == b"\x00\x00\x00\x02ab"
    assert LengthPrefixed(header="<H").encode(b"ab") == b"\x02\x00ab"


def test_length_prefixed_empty_payload() -> None:
    decoder = LengthPrefixed().decoder()
    assert decoder.feed(b"\x00\x00\x00\x00" * 3) == [b"", b"", b""]
    assert decoder.buffered == 0


def test_length_prefixed_accepts_any_bytes_like() -> None:
    codec = LengthPrefixed()
    for message in (b"xy", bytearray(b"xy"), memoryview(b"xy")):
        assert bytes(codec.encode(message)) == b"\x00\x00\x00\x02xy"
    decoder = codec.decoder()
    assert decoder.feed(memoryview(b"\x00\x00\x00\x01a")) == [b"a"]
    assert decoder.feed(bytearray(b"\x00\x00\x00\x01b")) == [b"b"]


def test_length_prefixed_rejects_bad_configuration() -> None:
    with pytest.raises(ValueError, match="unsupported length header"):
        LengthPrefixed(header="!i")
    with pytest.raises(ValueError, match="max_frame"):
        LengthPrefixed(max_frame=-1)


def test_length_prefixed_caps_max_frame_at_header_capacity() -> None:
    assert LengthPrefixed(header="!B").max_frame == 255
    assert LengthPrefixed(header="<H", max_frame=10).max_frame == 10


def test_length_prefixed_encode_errors_are_clear() -> None:
    codec = LengthPrefixed(max_frame=4)
    with pytest.raises(TypeError, match=r"LengthPrefixed.encode\(\) takes bytes.*not str"):
        codec.encode("text")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="not int"):
        codec.encode(5)  # type: ignore[arg-type]
    with pytest.raises(FrameTooLarge) as info:
        codec.encode(b"12345")
    assert (info.value.size, info.value.limit) == (5, 4)
    assert codec.encode(b"1234") == b"\x00\x00\x00\x041234"


def test_oversized_header_fails_before_any_payload() -> None:
    decoder = LengthPrefixed(max_frame=100).decoder()
    # The header alone is enough: no byte of the 101-byte payload is needed.
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(struct.pack("!I", 101))
    assert info.value.size == 101
    assert info.value.limit == 100
    assert "101" in str(info.value)
    assert "100" in str(info.value)


def test_oversized_header_split_across_chunks_fails_on_its_last_byte() -> None:
    decoder = LengthPrefixed(max_frame=1000).decoder()
    header = struct.pack("!I", 1 << 30)
    for byte in header[:-1]:
        assert decoder.feed(bytes([byte])) == []
    with pytest.raises(FrameTooLarge):
        decoder.feed(header[-1:])


def test_oversized_header_after_good_messages_in_one_chunk() -> None:
    codec = LengthPrefixed(max_frame=8)
    decoder = codec.decoder()
    with pytest.raises(FrameTooLarge):
        decoder.feed(codec.encode(b"ok") + struct.pack("!I", 9))


def test_max_frame_is_inclusive() -> None:
    codec = LengthPrefixed(max_frame=10)
    assert codec.decoder().feed(codec.encode(b"x" * 10)) == [b"x" * 10]
    with pytest.raises(FrameTooLarge):
        codec.decoder().feed(struct.pack("!I", 11))


def test_length_prefixed_buffered_counts_the_unfinished_message() -> None:
    codec = LengthPrefixed()
    decoder = codec.decoder()
    data = codec.encode(b"abcdef") + codec.encode(b"gh")
    assert decoder.feed(data[:7]) == []
    assert decoder.buffered == 7
    assert decoder.feed(data[7:12]) == [b"abcdef"]
    assert decoder.buffered == 2
    assert decoder.feed(data[12:]) == [b"gh"]
    assert decoder.buffered == 0


def test_decoder_does_not_alias_the_callers_buffer() -> None:
    # The fast path parses straight from the caller's chunk; whatever it keeps
    # must be a copy, since the caller may reuse its buffer.
    codec = LengthPrefixed()
    decoder = codec.decoder()
    chunk = bytearray(codec.encode(b"first") + codec.encode(b"second")[:6])
    messages = decoder.feed(chunk)
    chunk[:] = b"\xff" * len(chunk)
    assert messages == [b"first"]
    assert all(type(m) is bytes for m in messages)
    assert decoder.feed(b"cond") == [b"second"]


def test_decoders_are_independent() -> None:
    codec = LengthPrefixed()
    one, two = codec.decoder(), codec.decoder()
    one.feed(b"\x00\x00")
    assert two.buffered == 0
    assert two.feed(codec.encode(b"z")) == [b"z"]


@pytest.mark.parametrize(
    "codec",
    [LengthPrefixed(), Lines(), Raw()],
    ids=["length", "lines", "raw"],
)
def test_codecs_are_frozen_and_hashable(codec: Any) -> None:
    assert hash(codec) == hash(dataclasses.replace(codec))
    assert codec == dataclasses.replace(codec)
    field = dataclasses.fields(codec)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(codec, field, None)


def test_codec_equality_follows_configuration() -> None:
    assert LengthPrefixed("!H") != LengthPrefixed("!I")
    assert Lines(b"\r\n") != Lines(b"\n")
    assert len({LengthPrefixed(), LengthPrefixed(), Lines(), Raw()}) == 3


# -- Lines ---------------------------------------------------------------------


def test_lines_roundtrip_and_wire_layout() -> None:
    codec = Lines()
    assert codec.encode(b"one") == b"one\n"
    assert codec.decoder().feed(b"one\ntwo\n\nthree\n") == [b"one", b"two", b"", b"three"]


def test_lines_crlf_delimiter_split_between_chunks() -> None:
    decoder = Lines(b"\r\n").decoder()
    assert decoder.feed(b"GET / HTTP/1.1\r") == []
    assert decoder.feed(b"\nHost: x\r\n\r") == [b"GET / HTTP/1.1", b"Host: x"]
    assert decoder.feed(b"\n") == [b""]
    assert decoder.buffered == 0


def test_lines_keeps_a_lone_carriage_return_inside_a_crlf_line() -> None:
    assert Lines(b"\r\n").decoder().feed(b"a\rb\r\r\n") == [b"a\rb\r"]


def test_lines_rejects_bad_configuration() -> None:
    with pytest.raises(ValueError, match="delimiter"):
        Lines(b"")
    with pytest.raises(ValueError, match="delimiter"):
        Lines("\n")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_line"):
        Lines(max_line=-5)


def test_lines_encode_errors() -> None:
    codec = Lines(max_line=3)
    with pytest.raises(ValueError, match="delimiter"):
        codec.encode(b"a\nb")
    with pytest.raises(FrameTooLarge) as info:
        codec.encode(b"abcd")
    assert (info.value.size, info.value.limit) == (4, 3)
    with pytest.raises(TypeError, match="encode text to bytes first"):
        codec.encode("abc")  # type: ignore[arg-type]
    assert codec.encode(memoryview(b"abc")) == b"abc\n"


@pytest.mark.parametrize(
    ("delimiter", "message"),
    [(b"\r\n\r\n", b"header\r\n"), (b"aa", b"xa"), (b"aba", b"xab")],
)
def test_lines_encode_refuses_a_line_that_would_decode_differently(
    delimiter: bytes, message: bytes
) -> None:
    # The message does not contain the delimiter, but it ends with a part of
    # it that combines with the appended delimiter into an earlier match.
    codec = Lines(delimiter)
    assert delimiter not in message
    with pytest.raises(ValueError, match="delimiter"):
        codec.encode(message)


def test_line_of_exactly_max_line_is_accepted() -> None:
    decoder = Lines(max_line=4).decoder()
    assert decoder.feed(b"abcd\n") == [b"abcd"]
    with pytest.raises(FrameTooLarge):
        decoder.feed(b"abcde\n")


@pytest.mark.parametrize("delimiter", [b"\n", b"\r\n", b"<END>"])
def test_over_long_line_fails_as_soon_as_the_limit_is_passed(delimiter: bytes) -> None:
    decoder = Lines(delimiter, max_line=16).decoder()
    for _ in range(16):
        assert decoder.feed(b"x") == []
    with pytest.raises(FrameTooLarge) as info:
        decoder.feed(b"x")
    assert info.value.size == 17
    assert info.value.limit == 16


def test_over_long_line_waits_while_the_tail_may_be_a_delimiter() -> None:
    # 16 bytes of line, then "\r": it may be the start of "\r\n", so the line
    # is not known to be too long yet.
    decoder = Lines(b"\r\n", max_line=16).decoder()
    assert decoder.feed(b"x" * 16 + b"\r") == []
    assert decoder.feed(b"\n") == [b"x" * 16]


def test_over_long_line_in_a_single_chunk_with_its_delimiter() -> None:
    with pytest.raises(FrameTooLarge):
        Lines(max_line=8).decoder().feed(b"ok\n" + b"y" * 9 + b"\n")


# -- Raw -----------------------------------------------------------------------


def test_raw_returns_chunks_as_fed() -> None:
    decoder = Raw().decoder()
    assert decoder.feed(b"abc") == [b"abc"]
    assert decoder.feed(b"") == []
    assert decoder.feed(memoryview(b"de")) == [b"de"]
    assert decoder.buffered == 0


def test_raw_splits_large_chunks() -> None:
    decoder = Raw(max_chunk=4).decoder()
    assert decoder.feed(b"0123456789") == [b"0123", b"4567", b"89"]
    assert all(type(m) is bytes for m in decoder.feed(bytearray(b"abcdefgh")))


def test_raw_encode() -> None:
    codec = Raw()
    view = memoryview(b"abc")
    assert codec.encode(view) is view  # no copy on the way out
    with pytest.raises(TypeError, match="Raw"):
        codec.encode("abc")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_chunk"):
        Raw(max_chunk=0)


# -- properties ----------------------------------------------------------------

PROPERTY_SETTINGS = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
cuts = st.lists(st.integers(min_value=0, max_value=4000), max_size=30)


@PROPERTY_SETTINGS
@given(
    header=st.sampled_from(HEADERS),
    messages=st.lists(st.binary(max_size=300), max_size=20),
    cuts=cuts,
)
def test_length_prefixed_any_split_yields_the_messages(
    header: str, messages: list[bytes], cuts: list[int]
) -> None:
    codec = LengthPrefixed(header=header)
    stream = b"".join(bytes(codec.encode(m)) for m in messages if len(m) <= codec.max_frame)
    expected = [m for m in messages if len(m) <= codec.max_frame]
    decoder = codec.decoder()
    assert feed_all(decoder, split(stream, cuts)) == expected
    assert decoder.buffered == 0


@PROPERTY_SETTINGS
@given(
    delimiter=st.sampled_from([b"\n", b"\r\n", b"\r\n\r\n", b"aa", b"aba", b"\x00"]),
    # Messages over a three-letter alphabet drawn from the delimiter's own
    # bytes, so lines that end in part of a delimiter are common.
    raw=st.lists(st.lists(st.integers(0, 2), max_size=40), max_size=20),
    cuts=cuts,
)
def test_lines_any_split_yields_the_messages(
    delimiter: bytes, raw: list[list[int]], cuts: list[int]
) -> None:
    codec = Lines(delimiter, max_line=64)
    alphabet = (delimiter + b"y")[:1] + delimiter[-1:] + b"y"
    messages = [bytes(alphabet[i] for i in line) for line in raw]
    accepted, stream = [], bytearray()
    for message in messages:
        try:
            stream += codec.encode(message)
        except ValueError:
            # encode refuses a line it cannot frame unambiguously; the
            # roundtrip below proves it never accepts one that decodes wrong.
            continue
        accepted.append(message)
    decoder = codec.decoder()
    assert feed_all(decoder, split(bytes(stream), cuts)) == accepted
    assert decoder.buffered == 0


@PROPERTY_SETTINGS
@given(chunks=st.lists(st.binary(max_size=200), max_size=20), max_chunk=st.integers(1, 64))
def test_raw_concatenation_is_preserved(chunks: list[bytes], max_chunk: int) -> None:
    out = feed_all(Raw(max_chunk=max_chunk).decoder(), chunks)
    assert b"".join(out) == b"".join(chunks)
    assert all(0 < len(m) <= max_chunk for m in out)


def bounded_codecs() -> st.SearchStrategy[Any]:
    return st.one_of(
        st.builds(LengthPrefixed, header=st.sampled_from(HEADERS), max_frame=st.integers(0, 300)),
        st.builds(
            Lines,
            delimiter=st.sampled_from([b"\n", b"\r\n", b"\r\n\r\n"]),
            max_line=st.integers(0, 300),
        ),
        st.builds(Raw, max_chunk=st.integers(1, 300)),
    )


def bound_of(codec: Any) -> int:
    """The most a decoder may hold between two feeds."""
    if isinstance(codec, LengthPrefixed):
        return codec.header_size + codec.max_frame - 1
    if isinstance(codec, Lines):
        return codec.max_line + len(codec.delimiter) - 1
    return 0


@PROPERTY_SETTINGS
@given(codec=bounded_codecs(), chunks=st.lists(st.binary(max_size=500), max_size=30))
def test_arbitrary_bytes_raise_only_documented_errors_and_stay_bounded(
    codec: Any, chunks: list[bytes]
) -> None:
    decoder = codec.decoder()
    limit = bound_of(codec)
    for chunk in chunks:
        try:
            messages = decoder.feed(chunk)
        except ProtocolError:  # FrameTooLarge is a ProtocolError
            return
        assert all(type(m) is bytes for m in messages)
        assert 0 <= decoder.buffered <= max(limit, 0)


@PROPERTY_SETTINGS
@given(
    header=st.sampled_from(HEADERS),
    max_frame=st.integers(0, 200),
    excess=st.integers(1, 1 << 20),
    step=st.integers(1, 8),
)
def test_any_oversized_header_is_refused_on_its_last_byte(
    header: str, max_frame: int, excess: int, step: int
) -> None:
    codec = LengthPrefixed(header=header, max_frame=max_frame)
    announced = codec.max_frame + excess
    assume(announced < 1 << (8 * codec.header_size))
    decoder = codec.decoder()
    data = struct.pack(header, announced)
    with pytest.raises(FrameTooLarge) as info:
        feed_all(decoder, [data[i : i + step] for i in range(0, len(data), step)])
    assert info.value.size == announced


@PROPERTY_SETTINGS
@given(
    delimiter=st.sampled_from([b"\n", b"\r\n", b"\r\n\r\n"]),
    max_line=st.integers(0, 100),
    excess=st.integers(1, 100),
    step=st.integers(1, 300),
)
def test_any_over_long_line_is_refused_before_its_delimiter(
    delimiter: bytes, max_line: int, excess: int, step: int
) -> None:
    decoder = Lines(delimiter, max_line=max_line).decoder()
    line = b"z" * (max_line + excess)
    with pytest.raises(FrameTooLarge):
        # No delimiter is ever fed: the length alone must trigger the error.
        feed_all(decoder, [line[i : i + step] for i in range(0, len(line), step)])


# -- the optional batch encoder and the bytes fast path of the decoder ----------


@PROPERTY_SETTINGS
@given(
    header=st.sampled_from(HEADERS),
    messages=st.lists(st.binary(max_size=300), max_size=20),
    kinds=st.lists(st.sampled_from([bytes, bytearray, memoryview]), min_size=1),
)
def test_length_prefixed_encode_batch_equals_joined_encodes(
    header: str, messages: list[bytes], kinds: list[type]
) -> None:
    codec = LengthPrefixed(header=header)
    messages = [m for m in messages if len(m) <= codec.max_frame]
    mixed: list[Any] = [kinds[i % len(kinds)](m) for i, m in enumerate(messages)]
    batch = codec.encode_batch(mixed)
    assert type(batch) is bytes
    assert batch == b"".join(bytes(codec.encode(m)) for m in mixed)
    assert feed_all(codec.decoder(), [batch]) == messages


def test_encode_batch_refuses_what_encode_refuses_and_returns_nothing() -> None:
    codec = LengthPrefixed(max_frame=8)
    with pytest.raises(TypeError, match=r"not str \(encode text to bytes first\)"):
        codec.encode_batch([b"ok", "text"])  # type: ignore[list-item]
    with pytest.raises(FrameTooLarge) as info:
        codec.encode_batch([b"ok", b"x" * 9])
    assert (info.value.size, info.value.limit) == (9, 8)
    assert codec.encode_batch([b"x" * 8]) == b"\x00\x00\x00\x08" + b"x" * 8
    assert codec.encode_batch([]) == b""


def test_raw_encode_batch_joins_and_checks_types() -> None:
    codec = Raw()
    assert codec.encode_batch([b"ab", bytearray(b"c"), memoryview(b"de")]) == b"abcde"
    with pytest.raises(TypeError, match=r"Raw\.encode\(\) takes bytes"):
        codec.encode_batch([b"ab", 3])  # type: ignore[list-item]


@PROPERTY_SETTINGS
@given(
    messages=st.lists(st.binary(max_size=100), max_size=12),
    cuts=cuts,
    kind=st.sampled_from([bytes, bytearray, memoryview]),
)
def test_length_prefixed_decodes_the_same_from_any_buffer_type(
    messages: list[bytes], cuts: list[int], kind: type
) -> None:
    # bytes chunks take a separate fast path (slices of the chunk); every
    # kind of chunk must give the same messages, always as bytes.
    codec = LengthPrefixed(header="!H")
    stream = codec.encode_batch(messages)
    decoder = codec.decoder()
    out = feed_all(decoder, [kind(c) for c in split(stream, [c % 1200 for c in cuts])])
    assert out == messages
    assert all(type(m) is bytes for m in out)
    assert decoder.buffered == 0


def test_bytes_fast_path_refuses_an_oversized_header_and_buffers_the_tail() -> None:
    codec = LengthPrefixed(max_frame=4)
    decoder = codec.decoder()
    assert decoder.feed(codec.encode(b"abcd") + b"\x00\x00") == [b"abcd"]
    assert decoder.buffered == 2
    assert decoder.feed(b"\x00\x01z") == [b"z"]
    with pytest.raises(FrameTooLarge) as info:
        codec.decoder().feed(codec.encode(b"ok") + struct.pack("!I", 5))
    assert (info.value.size, info.value.limit) == (5, 4)
