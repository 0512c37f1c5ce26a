"""Numbers for people: sizes, rates and durations as a person reads them.

One helper for every place a person reads a size (CLI summaries, startup log
lines, the status page's API text), so `20 GiB` is written the same way
everywhere.  Units are binary (1 KiB = 1024 bytes), the same units
`casbah.config.parse_size` reads, so a quota printed back can be pasted into a
config.  Machine output (`--json`, `/metrics`) keeps plain byte counts.
"""

from __future__ import annotations

_UNITS = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def size(n: int | float) -> str:
    """`0 B`, `512 B`, `1.5 KiB`, `134.6 MiB`, `20 GiB`: at most one decimal, none when
    the value is whole (a quota of exactly 20 GiB reads `20 GiB`, not `20.0 GiB`)."""
    if n < 0:
        return f"-{size(-n)}"
    if n < 1024:
        return f"{int(n)} B"
    value, index = float(n) / 1024, 0
    while value >= 1024 and index < len(_UNITS) - 1:
        value, index = value / 1024, index + 1
    text = f"{value:.1f}".removesuffix(".0")
    if text == "1024" and index < len(_UNITS) - 1:  # 1023.96 MiB rounds up into the next unit
        return f"1 {_UNITS[index + 1]}"
    return f"{text} {_UNITS[index]}"


def rate(nbytes: int | float, seconds: float) -> str:
    """`nbytes` moved in `seconds`, per second (`0 B/s` when no time passed)."""
    return f"{size(nbytes / seconds if seconds > 0 else 0)}/s"


def duration(seconds: float) -> str:
    """`0.42s`, `12.3s`, `4m05s`, `2h03m`."""
    if seconds < 10:
        return f"{seconds:.2f}s"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def count(n: int, noun: str, plural: str | None = None) -> str:
    """`1 file`, `3 files`."""
    return f"{n} {noun if n == 1 else (plural or noun + 's')}"
