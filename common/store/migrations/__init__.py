"""The schema's migrations, in order; common/store/schema.py applies the missing ones.

One module per migration (VERSION, SQL). A migration is never edited once released: a
change is a new one; functions get a new name (`fanout_write_batch_v2`) so workers of
both releases run during an upgrade.
"""

from common.store.migrations import (
    m1_tables,
    m2_announced,
    m3_write_batch,
    m4_outbox,
    m5_write_batch_v2,
)

MIGRATIONS: list[tuple[int, str]] = [
    (m.VERSION, m.SQL)
    for m in (m1_tables, m2_announced, m3_write_batch, m4_outbox, m5_write_batch_v2)
]
