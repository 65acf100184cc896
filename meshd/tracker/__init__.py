"""The tracker: assigns parents and repairs the tree. Embed it in a trio host with
`serve_tracker`, or run `meshd tracker`.

    tracker = Tracker(TrackerConfig(refresh_s=120))
    host, port = await nursery.start(serve_tracker, tracker, key, "0.0.0.0", 4433)
    report = tracker.status(stream_id, trio.current_time())
"""

from meshd.tracker.front import collect_garbage_less_often
from meshd.tracker.server import serve_tracker
from meshd.tracker.service import Tracker, TrackerConfig

__all__ = ["Tracker", "TrackerConfig", "collect_garbage_less_often", "serve_tracker"]
