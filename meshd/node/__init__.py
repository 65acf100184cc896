"""The meshd daemon's node roles: the origin, and the relay/listener."""
