"""The flow level: hundreds of thousands of listeners, the real tracker, modelled nodes."""

from meshd.sim.flow.room import FlowOptions, FlowRoom

__all__ = ["FlowOptions", "FlowRoom"]
