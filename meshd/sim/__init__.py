"""Simulated rooms over the real cores: `meshd sim` and the fault hunts.

Two levels. The chunk level (`world.World`) runs the real `NodeCore`, `OriginCore` and
`Tracker` on a modelled network, chunk by chunk: exact, and good for hundreds of
listeners. The flow level (`flow.FlowRoom`) runs the real `Tracker` and models each
listener's decisions at the granularity of links and its audio per path: good for
hundreds of thousands.
"""
