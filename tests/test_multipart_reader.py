"""The upload's multipart reader (runtime/multipart_reader.py): the same parts as python-multipart's parser
whatever the chunking, announced data passed unsearched, and malformed bodies refused."""
from __future__ import annotations

import random

import pytest
from python_multipart.multipart import MultipartParser

from loraplex.runtime.multipart_reader import MAX_HEADER_BYTES, MultipartError, MultipartReader

BOUNDARY = b"b0undary-7f3a"


def body(parts: list[tuple[bytes, bytes]], preamble: bytes = b"", epilogue: bytes = b"") -> bytes:
    out = preamble
    for name, value in parts:
        out += (b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="' + name + b'"\r\n\r\n' + value +
                b"\r\n")
    return out + b"--" + BOUNDARY + b"--\r\n" + epilogue


def read(data: bytes, cuts: list[int], announce: dict[bytes, int] | None = None) -> list[tuple]:
    """The parts (headers, data) the reader gives for `data` fed in pieces cut at `cuts`; `announce`: for a
    part named so, its data's length, said after the part's first data event."""
    reader, parts = MultipartReader(BOUNDARY), []
    name = None
    for start, stop in zip([0] + cuts, cuts + [len(data)]):
        for event in reader.feed(data[start:stop]):
            if event[0] == "part":
                parts.append([event[1], b""])
                name = event[1].get(b"content-disposition", b"").partition(b'name="')[2].partition(b'"')[0]
            elif event[0] == "data":
                parts[-1][1] += bytes(event[1])
                if announce and name in announce and not reader.data_ahead and len(parts[-1][1]) < announce[name]:
                    reader.data_ahead = announce[name] - len(parts[-1][1])
            else:
                parts[-1].append("end")
    reader.finish()
    return [(headers, value) for headers, value, *_ in parts]


def python_multipart_values(data: bytes) -> list[bytes]:
    values = []
    parser = MultipartParser(BOUNDARY, {"on_part_begin": lambda: values.append(b""),
                                        "on_part_data": lambda d, s, e: values.__setitem__(-1, values[-1] + d[s:e])})
    parser.write(data)
    parser.finalize()
    return values


def test_same_parts_as_python_multipart_whatever_the_chunking():
    rng = random.Random(0)
    delimiter_bits = [b"\r", b"\r\n", b"\r\n-", b"\r\n--", b"\r\n--" + BOUNDARY[:5], b"--" + BOUNDARY]
    for trial in range(60):
        parts = []
        for i in range(rng.randint(1, 4)):
            while True:  # a value a client may send: the delimiter only after it
                value = b"".join(rng.choice(delimiter_bits + [bytes(rng.randrange(256) for _ in range(9))])
                                 for _ in range(rng.randint(0, 12)))
                if (value + b"\r\n--" + BOUNDARY).find(b"\r\n--" + BOUNDARY) == len(value):
                    break
            parts.append((b"f%d" % i, value))
        data = body(parts, epilogue=b"ignored" if trial % 2 else b"")
        expected = python_multipart_values(data)
        assert expected == [value for _, value in parts]
        for _ in range(5):
            cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 12))))
            assert [value for _, value in read(data, cuts)] == expected, (data, cuts)
        assert [value for _, value in read(data, list(range(1, len(data))))] == expected  # a byte at a time


def test_preamble_padding_and_empty_headers():
    data = (b"a preamble\r\n--" + BOUNDARY + b" \t\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\nvalue\r\n--" +
            BOUNDARY + b"\r\n\r\nno headers\r\n--" + BOUNDARY + b"--")
    parts = read(data, [3, 20, 60])
    assert parts == [({b"content-disposition": b'form-data; name="x"'}, b"value"), ({}, b"no headers")]


def test_announced_data_is_not_searched():
    """Bytes the reader was told are data pass even when they hold the delimiter; the search resumes after
    them. (Told once the part's first data event is in: here its first 4 bytes, a chunk of their own.)"""
    inner = b"0123\r\n--" + BOUNDARY + b"\r\nlooks like a part\r\n\r\n" + b"x" * 50
    data = body([(b"weights", inner), (b"id", b"after")])
    head = data.index(inner) + 4
    for cuts in ([head], [head - 2, head, head + 1, head + 40], [head] + list(range(head + 1, len(data), 7))):
        parts = read(data, cuts, announce={b"weights": len(inner)})
        assert [value for _, value in parts] == [inner, b"after"]
    with pytest.raises(MultipartError, match="looks like a part"):  # unannounced: the delimiter ends the part
        read(data, [head])


def test_announced_data_longer_or_shorter_than_sent():
    data = body([(b"weights", b"w" * 40)])
    cut = data.index(b"w" * 40) + 5
    with pytest.raises(MultipartError, match="bytes before the end its part announced"):
        read(data, [cut], announce={b"weights": 10 ** 6})
    parts = read(data, [cut], announce={b"weights": 20})  # fewer announced than sent: the rest searched, still data
    assert parts[0][1] == b"w" * 40


@pytest.mark.parametrize("data, message", [
    (b"--" + BOUNDARY + b"\r\nContent-Disposition: form-data; name=\"x\"\r\n\r\nvalue", "before the closing"),
    (b"--" + BOUNDARY + b"junk\r\n\r\n\r\n--" + BOUNDARY + b"--", "after a boundary"),
    (b"--" + BOUNDARY + b"\r\nno colon here\r\n\r\nv\r\n--" + BOUNDARY + b"--", "malformed part header"),
    (b"--" + BOUNDARY + b"\r\nX-Long: " + b"a" * (MAX_HEADER_BYTES + 10), "longer than"),
    (b"no delimiter at all", "before the closing"),
])
def test_malformed_bodies_refused(data, message):
    with pytest.raises(MultipartError, match=message):
        read(data, [len(data) // 2])


def test_boundary_checked():
    for boundary in (b"", b"a\r\nb", b"x" * 201):
        with pytest.raises(MultipartError):
            MultipartReader(boundary)
