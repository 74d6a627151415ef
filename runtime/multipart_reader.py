"""multipart/form-data (RFC 7578) read as its bytes arrive: each part's headers, then its data as views of the
received chunks (no copy), then its end.

The body is read as if a CRLF came before it, so that every delimiter, the first one included, is
CRLF "--" boundary. A reader that knows how many more bytes of the current part's data are coming says so
(`data_ahead`): those go through without being searched for the delimiter. An upload's weights give their
length in their safetensors header; searching every byte of them was a third of the event loop's time while a
large upload arrived (python-multipart's parser, with no way to skip). A client that sends what it announced
puts the delimiter right after them, where the search resumes; one that sends fewer ends inside the part
(`finish` says so), one that sends more gives the reader more data than announced, for it to refuse.
"""
from __future__ import annotations

from typing import Iterator

MAX_HEADER_BYTES = 16 << 10  # one part's header block
MAX_PADDING_BYTES = 256  # between a delimiter and its CRLF (transport padding: spaces and tabs)
PREAMBLE, DELIMITED, HEADERS, DATA, DONE = range(5)


class MultipartError(ValueError):
    pass


class MultipartReader:
    """Feed the body's chunks in order to `feed`, which yields ("part", headers) with the part's headers as a
    dict of lower-case names to values (bytes), ("data", memoryview) and ("end",) per part; then call
    `finish`. The epilogue after the closing delimiter is ignored, as the RFC says."""

    def __init__(self, boundary: bytes):
        if not 1 <= len(boundary) <= 200 or b"\r" in boundary or b"\n" in boundary:
            raise MultipartError("invalid multipart boundary")
        self.delimiter = b"\r\n--" + boundary
        self.state = PREAMBLE
        self.data_ahead = 0  # bytes of the current part's data still to come, not searched (set by the caller)
        self._held = b"\r\n"  # bytes between two chunks: a possible start of a delimiter, a header block not yet
                              # complete, a delimiter line not yet ended

    def feed(self, chunk: bytes) -> Iterator[tuple]:
        data = self._held + chunk if self._held else chunk  # (held bytes are few, except in a header block)
        self._held = b""
        view = memoryview(data)
        pos = 0
        while pos < len(data) and self.state != DONE:
            if self.state in (PREAMBLE, DATA):
                if self.data_ahead and self.state == DATA:
                    n = min(self.data_ahead, len(data) - pos)
                    self.data_ahead -= n
                    pos += n
                    yield "data", view[pos - n:pos]
                    continue
                at = data.find(self.delimiter, pos)
                if at < 0:
                    keep = self._delimiter_start_at_end(data, pos)
                    self._held = data[keep:]
                    if self.state == DATA and keep > pos:
                        yield "data", view[pos:keep]
                    return
                if self.state == DATA:
                    if at > pos:
                        yield "data", view[pos:at]
                    yield ("end",)
                pos = at + len(self.delimiter)
                self.state = DELIMITED
            elif self.state == DELIMITED:
                if len(data) - pos < 2:
                    break
                if data.startswith(b"--", pos):
                    self.state = DONE
                    break
                line_end = data.find(b"\r\n", pos, pos + MAX_PADDING_BYTES + 2)
                if line_end < 0:
                    if len(data) - pos > MAX_PADDING_BYTES:
                        raise MultipartError("a boundary line does not end")
                    break
                if data[pos:line_end].strip(b" \t"):
                    raise MultipartError("bytes after a boundary on its line")
                pos = line_end  # the header block is then CRLF (header CRLF)* CRLF: an empty one included
                self.state = HEADERS
            else:  # HEADERS
                end = data.find(b"\r\n\r\n", pos, pos + MAX_HEADER_BYTES)
                if end < 0:
                    if len(data) - pos > MAX_HEADER_BYTES:
                        raise MultipartError(f"a part's headers are longer than {MAX_HEADER_BYTES} bytes")
                    break
                headers = self._headers(data[pos + 2:end])
                pos = end + 4
                self.state = DATA
                self.data_ahead = 0
                yield "part", headers
        if self.state != DONE:
            self._held = data[pos:]

    def _delimiter_start_at_end(self, data: bytes, pos: int) -> int:
        """Where the longest tail of `data` that could begin a delimiter starts (len(data) if none). A boundary
        holds no CR, so only the last CR of the tail can begin one."""
        k = data.rfind(b"\r", max(pos, len(data) - len(self.delimiter) + 1))
        return k if k >= 0 and self.delimiter.startswith(data[k:]) else len(data)

    @staticmethod
    def _headers(block: bytes) -> dict[bytes, bytes]:
        headers = {}
        for line in block.split(b"\r\n") if block else ():
            name, colon, value = line.partition(b":")
            if not colon or not name.strip():
                raise MultipartError(f"malformed part header {line[:100]!r}")
            headers[name.strip().lower()] = value.strip()
        return headers

    def finish(self) -> None:
        """The body has ended: raise unless it ended with the closing delimiter."""
        if self.state == DONE:
            return
        if self.state == DATA and self.data_ahead:
            raise MultipartError(f"the body ended {self.data_ahead} bytes before the end its part announced")
        raise MultipartError("the body ended before the closing boundary")
