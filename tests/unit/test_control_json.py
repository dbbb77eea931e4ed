"""The control socket's input splitter: a byte stream in, whole JSON texts (or errors) out."""

from __future__ import annotations

import json

from vhostd.shell.control import MAX_DEPTH, MAX_INPUT, JsonSplitter, QmpError


def feed_all(chunks: list[bytes]) -> list[object]:
    """What the splitter yields for ``chunks``: parsed texts, or ("error", desc)."""
    s = JsonSplitter()
    out: list[object] = []
    for chunk in chunks:
        for item in s.feed(chunk):
            if isinstance(item, QmpError):
                out.append(("error", item.desc))
            else:
                try:
                    out.append(json.loads(item))
                except ValueError:
                    out.append(("bad", item))
    return out


def test_texts_one_after_another_with_or_without_space() -> None:
    assert feed_all([b'{"a": 1}{"b": [2, {"c": 3}]}\r\n  {"d": "}{"}\n']) == [
        {"a": 1}, {"b": [2, {"c": 3}]}, {"d": "}{"}]


def test_a_text_over_many_reads_byte_by_byte() -> None:
    text = b'{"execute": "x", "arguments": {"s": "a\\"b\\\\", "l": [1, [2]]}, "id": 7}'
    assert feed_all([bytes([b]) for b in text]) == [json.loads(text)]


def test_escape_at_the_end_of_a_read() -> None:
    assert feed_all([b'{"s": "a\\', b'"b"}']) == [{"s": 'a"b'}]


def test_top_level_scalars_end_at_a_delimiter() -> None:
    assert feed_all([b"12", b"3 true", b' "str"{}']) == [123, True, "str", {}]


def test_garbage_tokens_and_stray_closers() -> None:
    out = feed_all([b"garbage ] {\"ok\": 1}"])
    assert out[0] == ("bad", b"garbage")
    assert out[1][0] == "error" and "']'" in out[1][1]
    assert out[2] == {"ok": 1}


def test_a_control_character_drops_the_text_being_read() -> None:
    out = feed_all([b'{"execute": "half', b'\x01{"execute": "whole"}'])
    assert out[0][0] == "error" and "0x01" in out[0][1]
    assert out[1] == {"execute": "whole"}
    out = feed_all([b'[1, 2\x1b[3]'])
    assert out[0][0] == "error" and out[1] == [3]
    assert feed_all([b"\xff{}"])[1] == {}


def test_deep_nesting_is_one_error() -> None:
    depth = MAX_DEPTH + 50
    out = feed_all([b"[" * depth, b"]" * depth, b"{}"])
    assert out == [("error", f"JSON parse error, nesting deeper than {MAX_DEPTH}"), {}]


def test_an_overlong_text_is_one_error_and_is_not_kept() -> None:
    s = JsonSplitter()
    assert s.feed(b'{"x": "') == []
    for _ in range(3 * MAX_INPUT // 65536):
        assert s.feed(b"y" * 65536) == []
        assert len(s.buf) <= MAX_INPUT + 65536
    [err] = s.feed(b'"}')
    assert isinstance(err, QmpError) and "longer than" in err.desc
    assert [json.loads(t) for t in s.feed(b'{"after": 1}')] == [{"after": 1}]
