"""The event lake: events, profiles, identities (and the evaluation truth) as Delta Lake tables.

``TableWriter`` is the one writer of every producer (``flashcrowd gen``, ``flashcrowd data import``,
the compactor); ``LakeSnapshot`` is what ``EventDataset`` reads when a prefix holds a lake
(``lake.json``). See services/events/README.md, "Event lake".
"""

from services.events.lake.descriptor import LAKE_FORMAT, descriptor_key, read_descriptor, write_descriptor
from services.events.lake.location import TableLocation, table_location
from services.events.lake.physical import LAKE_TABLES, PARTITION_COLUMNS, to_logical, to_physical
from services.events.lake.snapshot import LakeSnapshot
from services.events.lake.writer import CommitConflict, TableWriter

__all__ = [
    "LAKE_FORMAT",
    "LAKE_TABLES",
    "PARTITION_COLUMNS",
    "CommitConflict",
    "LakeSnapshot",
    "TableLocation",
    "TableWriter",
    "descriptor_key",
    "read_descriptor",
    "table_location",
    "to_logical",
    "to_physical",
    "write_descriptor",
]
