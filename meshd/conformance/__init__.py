"""A black-box conformance suite for meshd/2 (docs/spec.md), run over the wire.

Point it at an implementation's address: it drives it only through real QUIC
connections, with numbered cases tied to spec sections, and reports what each case
sent, expected and got back. `meshd conformance --help` runs it from the command line;
docs/conformance.md lists the cases. From Python:

    from meshd.conformance.runner import check_tracker

    report = await check_tracker(("127.0.0.1", 4433))
    assert report.ok, report.format()

This module imports nothing, so that `meshd` can register the command without loading
the suite.
"""
