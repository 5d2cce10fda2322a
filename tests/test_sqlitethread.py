"""Transactions on the connection's own thread, durable or not."""

from __future__ import annotations

from pathlib import Path

from dicomhub.sqlitethread import SQLiteThread


async def test_a_transaction_may_skip_waiting_for_the_disk_and_the_next_waits_again(
        tmp_path: Path) -> None:
    db = SQLiteThread("test")
    con = await db.open(tmp_path / "t.sqlite3")
    try:
        await db.transaction(lambda c: c.execute("CREATE TABLE t (n INTEGER)"))
        seen = []
        for durable in (True, False, False, True):
            seen.append(await db.transaction(lambda c, d=durable: (
                c.execute("INSERT INTO t VALUES (?)", (int(d),)),
                c.execute("PRAGMA synchronous").fetchone()[0])[1], durable=durable))
        assert seen == [2, 1, 1, 2]  # FULL, NORMAL, NORMAL, FULL
        assert await db.run(lambda: con.execute("SELECT count(*) FROM t").fetchone()[0]) == 4
    finally:
        await db.close()
