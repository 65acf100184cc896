"""docs/spec.md and the code agree: error codes and message type codes."""

from __future__ import annotations

import re
from pathlib import Path

from protocol import ErrorCode
from protocol.codec import SCHEMA

SPEC = (Path(__file__).parent.parent / "docs" / "spec.md").read_text()
ROW = re.compile(r"^\| (0x[0-9A-Fa-f]{2}) \| ([A-Z_]+) \|", re.MULTILINE)


def section(title: str) -> str:
    start = SPEC.index(title)
    end = SPEC.find("\n## ", start + 1)
    return SPEC[start : end if end != -1 else None]


def test_error_code_table_matches_error_code_enum() -> None:
    rows = {name: int(code, 16) for code, name in ROW.findall(section("## 9. Error codes"))}
    assert rows == {member.name: member.value for member in ErrorCode}


def test_message_type_tables_match_the_codec() -> None:
    rows = {int(code, 16): name for code, name in ROW.findall(section("## 5. Messages"))}
    spec_name = {
        "StatusRequest": "STATUS",
        "StatusReport": "STATUS_REPORT",
        "PathUpdate": "PATH",
        "TreeRequest": "TREE",
    }
    for cls in SCHEMA:
        expected = spec_name.get(cls.__name__) or re.sub(r"(?<!^)(?=[A-Z])", "_", cls.__name__)
        assert rows.get(cls.TYPE) == expected.upper(), cls.__name__
    assert len({code for code in rows}) == len(SCHEMA)
