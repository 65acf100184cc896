"""Case results and the three reports: a terminal summary, JSON and JUnit XML.

Verdicts follow Autobahn|Testsuite: a case *passes*, *fails*, is *non-strict* (the
implementation did something acceptable that is not exactly what the spec says, or
missed a SHOULD), is *informational* (the spec leaves the behaviour open; the report
records what came back) or is *skipped* (the target cannot be tested that way, e.g.
token cases without the host's key).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from enum import Enum
from pathlib import Path
from xml.etree import ElementTree


class Level(Enum):
    MUST = "MUST"
    SHOULD = "SHOULD"
    INFO = "INFO"
    """The spec does not settle it: the case only records what the implementation does."""


class Verdict(Enum):
    PASS = "pass"
    FAIL = "fail"
    NON_STRICT = "non-strict"
    INFORMATIONAL = "informational"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class Outcome:
    """What one case sent, what the spec expects back, and what came back."""

    verdict: Verdict
    sent: str
    expected: str
    got: str
    note: str = ""


@dataclass(frozen=True)
class CaseResult:
    id: str
    section: str
    level: Level
    title: str
    verdict: Verdict
    sent: str
    expected: str
    got: str
    note: str
    seconds: float

    def to_json(self) -> dict[str, object]:
        data = asdict(self)
        data["level"] = self.level.value
        data["verdict"] = self.verdict.value
        data["seconds"] = round(self.seconds, 3)
        return data


@dataclass(frozen=True)
class Report:
    target: str
    """What was tested, e.g. `tracker 127.0.0.1:4433`."""
    results: tuple[CaseResult, ...]

    @property
    def must_failures(self) -> list[CaseResult]:
        return [r for r in self.results if r.level is Level.MUST and r.verdict is Verdict.FAIL]

    @property
    def ok(self) -> bool:
        """Every MUST case passed (or was non-strict, or could not be run)."""
        return not self.must_failures

    def counts(self) -> Counter[Verdict]:
        return Counter(r.verdict for r in self.results)

    def by_id(self, case_id: str) -> CaseResult:
        for result in self.results:
            if result.id == case_id:
                return result
        raise KeyError(case_id)

    def to_json(self) -> dict[str, object]:
        return {
            "target": self.target,
            "ok": self.ok,
            "counts": {verdict.value: self.counts()[verdict] for verdict in Verdict},
            "cases": [r.to_json() for r in self.results],
        }

    def write_json(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")

    def write_junit(self, path: Path) -> None:
        """One <testsuite> per spec section; non-strict and informational cases pass with
        their finding in <system-out>, skipped cases are <skipped>."""
        root = ElementTree.Element("testsuites", name=f"meshd conformance: {self.target}")
        for section, results in _by_section(self.results).items():
            suite = ElementTree.SubElement(
                root,
                "testsuite",
                name=f"section {section}",
                tests=str(len(results)),
                failures=str(sum(r.verdict is Verdict.FAIL for r in results)),
                skipped=str(sum(r.verdict is Verdict.SKIPPED for r in results)),
            )
            for result in results:
                case = ElementTree.SubElement(
                    suite,
                    "testcase",
                    classname=f"meshd.conformance.{section}",
                    name=f"{result.id} [{result.level.value}]",
                    time=f"{result.seconds:.3f}",
                )
                detail = _detail(result)
                if result.verdict is Verdict.FAIL:
                    failure = ElementTree.SubElement(case, "failure", message=result.got[:200])
                    failure.text = detail
                elif result.verdict is Verdict.SKIPPED:
                    ElementTree.SubElement(case, "skipped", message=result.note or result.got)
                else:
                    ElementTree.SubElement(
                        case, "system-out"
                    ).text = f"{result.verdict.value}\n{detail}"
        ElementTree.indent(root)
        ElementTree.ElementTree(root).write(path, encoding="utf-8", xml_declaration=True)

    def format(self, *, verbose: bool = False) -> str:
        """The terminal summary: per section counts, then every case that did not pass
        (every case with `verbose`) with what was sent, expected and got."""
        lines = [f"meshd/2 conformance: {self.target}", ""]
        for section, results in _by_section(self.results).items():
            counts = Counter(r.verdict for r in results)
            summary = ", ".join(f"{counts[v]} {v.value}" for v in Verdict if counts[v])
            lines.append(f"  §{section:<5} {len(results):3} cases: {summary}")
        shown = [r for r in self.results if verbose or r.verdict is not Verdict.PASS]
        shown.sort(key=lambda r: r.verdict is Verdict.SKIPPED)
        for result in shown:
            heading = f"{result.verdict.value.upper()}  {result.id}  [{result.level.value}]"
            if result.verdict is Verdict.SKIPPED:
                lines.append(f"{heading}  {result.note}")
                continue
            lines += ["", heading]
            lines += ["    " + line for line in _detail(result).splitlines()]
        counts = self.counts()
        lines += [
            "",
            f"{len(self.results)} cases: "
            + ", ".join(f"{counts[v]} {v.value}" for v in Verdict if counts[v]),
            "every MUST passed" if self.ok else f"{len(self.must_failures)} MUST case(s) failed",
        ]
        return "\n".join(lines)


def _detail(result: CaseResult) -> str:
    lines = [
        f"§{result.section}: {result.title}",
        f"sent:     {result.sent}",
        f"expected: {result.expected}",
        f"got:      {result.got}",
    ]
    if result.note:
        lines.append(f"note:     {result.note}")
    return "\n".join(lines)


def _section_key(section: str) -> tuple[int, ...]:
    return tuple(int(part) for part in section.split(".") if part.isdigit())


def _by_section(results: tuple[CaseResult, ...]) -> dict[str, list[CaseResult]]:
    grouped: dict[str, list[CaseResult]] = {}
    for result in sorted(results, key=lambda r: _section_key(r.section)):
        grouped.setdefault(result.section, []).append(result)
    return grouped
