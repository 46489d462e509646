"""``ingest``: EventService alone (batches of events onto the JetStream bus), as its own Deployment.

The ingest path itself lives in ``services/events/ingest.py``: the audience process mounts the same
EventService (so the embedded default needs no extra process), and this package deploys it apart
when ingest traffic should scale apart from pack serving.
"""
