"""A black-box conformance suite for meshd/1 (docs/spec.md), run over the wire.

Point it at an implementation's address: it drives it only through real QUIC
connections, with numbered cases tied to spec sections, and reports what each case
sent, expected and got back. `meshd conformance --help` runs it from the command line;
docs/conformance.md lists the cases.

    report = await check_tracker(("127.0.0.1", 4433))
    assert report.ok, report.format()
"""

from meshd.conformance.report import CaseResult, Level, Report, Verdict
from meshd.conformance.runner import check_parent, check_tracker

__all__ = ["CaseResult", "Level", "Report", "Verdict", "check_parent", "check_tracker"]
