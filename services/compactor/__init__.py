"""``compactor``: events from the bus into the day-partitioned dataset, exactly once (its own Deployment).

The compacting itself lives in ``services/events/compactor.py`` (shared with the embedded default,
where the audience process runs it on the in-process bus); this package is the deployable.
"""
