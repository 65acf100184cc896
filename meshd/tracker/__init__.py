"""The tracker: assigns each node of a stream a parent in a relay tree rooted at the origin."""
