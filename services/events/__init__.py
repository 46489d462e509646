"""Event data: schemas and codes, user sharding, the dataset reader and the flash-sale generator.

Modules: ``schema`` (polars schemas, ``EventType`` and other codes, ``validate_events``),
``sharding`` (user -> bucket -> shard), ``identity`` (normalise and hash external ids),
``dataset`` (``EventDataset``: manifest-driven reads from any object store), ``world`` (catalog and
story constants), ``generator`` (``flashcrowd gen``); the real-time path: ``columns`` (ingest requests
decoded from the protobuf wire into numpy columns and validated there), ``codec`` (per-shard Arrow
IPC messages), ``bus``, ``ingest``, ``compactor`` (see ``REALTIME.md``).
"""
