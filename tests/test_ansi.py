"""Tests of gitpipe.ansi: only SGR colours and bold survive, in the terminal and in HTML."""

from __future__ import annotations

import pytest

from gitpipe import ansi

ESC = "\x1b"


@pytest.mark.parametrize("sequence", [
    f"{ESC}]0;PWNED{ESC}\\",  # OSC window title, ST-terminated
    f"{ESC}]2;PWNED\x07",  # OSC title, BEL-terminated
    f"{ESC}[2J", f"{ESC}[H", f"{ESC}[10;5H", f"{ESC}[3A", f"{ESC}[?25l", f"{ESC}[6n",  # erase, moves, queries
    f"{ESC}7", f"{ESC}8", f"{ESC}c", f"{ESC}(0",  # save/restore cursor, reset, charset
    f"{ESC}P+q544e{ESC}\\",  # DCS
    f"{ESC}_payload{ESC}\\",  # APC
    "\x9b2J", "\x9d0;PWNED\x07",  # 8-bit CSI and OSC
    "\x08\x08\x08", "\x07", "\x00", "\x7f", "\r",  # backspaces, bell, NUL, DEL, carriage return
    "\u202e",  # right-to-left override
])
def test_sanitize_drops_everything_but_sgr(sequence: str) -> None:
    out = ansi.sanitize(f"before{sequence}after")
    assert out.startswith("before") and out.endswith("after")
    assert ESC not in out and "\x9b" not in out and "\r" not in out and "\x08" not in out


def test_unterminated_osc_runs_to_the_end() -> None:
    assert ansi.sanitize(f"before{ESC}]0;PWNED and the rest") == "before"


def test_sanitize_keeps_colours_and_bold() -> None:
    text = f"{ESC}[1;31mred{ESC}[0m {ESC}[38;5;208morange{ESC}[m {ESC}[38;2;10;20;30mrgb{ESC}[39m"
    assert ansi.sanitize(text) == text


def test_sanitize_filters_inside_sgr() -> None:
    # Conceal (8), blink (5) and inverse (7) go; the colour of the same sequence stays.
    assert ansi.sanitize(f"{ESC}[8;31mhidden?") == f"{ESC}[31mhidden?"
    assert ansi.sanitize(f"{ESC}[5mx") == "x"
    assert ansi.sanitize(f"{ESC}[38;5;999mx") == "x"  # no such colour


def test_hyperlink_keeps_its_text_only() -> None:
    link = f"{ESC}]8;;https://evil.example/{ESC}\\click me{ESC}]8;;{ESC}\\"
    assert ansi.sanitize(link) == "click me"


def test_a_cut_sequence_cannot_join_the_next_line() -> None:
    # "\x1b[2" at the end of one printed line and "J" at the start of the next would clear the screen.
    assert ESC not in ansi.sanitize(f"line one{ESC}[2")
    assert ESC not in ansi.sanitize(f"x{ESC}")


def test_crlf_becomes_a_newline() -> None:
    assert ansi.sanitize("a\r\nb") == "a\nb"


def test_strip_removes_all_escapes() -> None:
    assert ansi.strip(f"{ESC}[1;32mok{ESC}[0m {ESC}]0;t\x07done") == "ok done"


def test_to_html_escapes_text() -> None:
    html = str(ansi.to_html('<script>alert("x")</script> & \'q\''))
    assert "<script>" not in html
    assert html == "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; &#39;q&#39;"


def test_to_html_spans_for_colours() -> None:
    html = str(ansi.to_html(f"{ESC}[1;31mFAILED{ESC}[0m plain {ESC}[92mbright{ESC}[0m"))
    assert html == '<span class="ab f1">FAILED</span> plain <span class="f10">bright</span>'


def test_to_html_256_and_true_colour() -> None:
    html = str(ansi.to_html(f"{ESC}[38;5;196mA{ESC}[48;5;21mB{ESC}[39;49mC{ESC}[38;2;255;0;0mD"))
    assert html == '<span class="f196">A</span><span class="f196 g21">B</span>C<span class="f196">D</span>'


def test_to_html_resets_and_partial_resets() -> None:
    html = str(ansi.to_html(f"{ESC}[1;4;33mx{ESC}[22my{ESC}[24mz{ESC}[mw"))
    assert html == '<span class="ab au f3">x</span><span class="au f3">y</span><span class="f3">z</span>w'


def test_to_html_has_no_style_attribute() -> None:
    # The pages' Content-Security-Policy forbids inline style: colours are classes.
    assert "style=" not in str(ansi.to_html(f"{ESC}[38;2;1;2;3;48;5;100mx"))


def test_to_html_drops_title_changes() -> None:
    assert str(ansi.to_html(f"{ESC}]0;PWNED\x07ok")) == "ok"


def test_palette() -> None:
    palette = ansi.palette_256()
    assert len(palette) == 240
    assert palette[196 - 16] == "#ff0000"
    assert palette[231 - 16] == "#ffffff"
    assert ansi.nearest_256(255, 0, 0) == 196
    assert ansi.nearest_256(128, 128, 128) == 244


def test_an_unterminated_string_ends_with_its_line() -> None:
    # The plain copy of a log strips many lines at once: an OSC left open must not eat the next ones.
    assert ansi.strip(f"one{ESC}]0;open\ntwo\x07three\n") == "one\ntwothree\n"


def test_dropping_a_control_never_makes_a_new_sequence() -> None:
    # One pass: NUL or CR between ESC and "[2J" does not join them into a clear-screen.
    for glue in ("\x00", "\r", "\x01"):
        assert ansi.sanitize(f"a{ESC}{glue}[2Jb") == "a[2Jb"


PIECES = ["a", "Z", "9", " ", "[", "m", ";", "\n", "\t", ESC, f"{ESC}[", f"{ESC}[31m", f"{ESC}[0m", f"{ESC}[2J",
          f"{ESC}]0;t", "\x07", f"{ESC}\\", f"{ESC}(0", "\x00", "\r", "\x01", "\x7f", "\x9b", "\u202e", "é", "\x85"]


def test_strip_is_sanitize_without_colours_and_bytes_agree() -> None:
    """strip, sanitize and the masker's byte pattern (TOKEN_BYTES) drop the same characters."""
    import random
    import re

    rng = random.Random(5)
    tokens = re.compile(ansi.TOKEN_BYTES)
    for _ in range(3000):
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 12)))
        stripped = ansi.strip(text)
        assert stripped == re.sub(r"\x1b\[[0-9;]*m", "", ansi.sanitize(text)), repr(text)
        assert tokens.sub(b"", text.encode()).decode() == stripped, repr(text)
        assert not any(c in stripped for c in (ESC, "\x07", "\x9b", "\r", "\x00"))


def test_visible_shows_controls_as_escapes() -> None:
    assert ansi.visible(f"x{ESC}]0;t\x07\x9b\u202ey\n\tz") == "x\\x1b]0;t\\x07\\x9b\\u202ey\n\tz"
