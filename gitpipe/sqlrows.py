"""The few row operations the store needs, on one sqlite3 connection: query, insert, update, upsert.

They replace sqlite-utils in the daemon (measured, issue 11): importing it loads click,
pluggy and importlib.metadata (~14 MB resident, ~45 ms), and each of its `update` calls
adds a SELECT, a PRAGMA and a SAVEPOINT around the one UPDATE. Here every call is one
statement (an upsert: an UPDATE, then an INSERT when it changed no row), inside the
caller's transaction (`Store.tx`). The schema is store.py's migrations; the tables'
primary keys are read once from SQLite.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from typing import Any


class Rows:
    """What `Store.tx()` yields: `execute`, `query` and `table(name)` on one connection."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self._pks: dict[str, tuple[str, ...]] = {}

    def execute(self, sql: str, params: Sequence[Any] = ()) -> sqlite3.Cursor:
        return self.conn.execute(sql, params)

    def query(self, sql: str, params: Sequence[Any] = ()) -> Iterator[dict[str, Any]]:
        cur = self.conn.execute(sql, params)
        names = [d[0] for d in cur.description or ()]
        for row in cur:
            yield dict(zip(names, row))

    def table(self, name: str) -> Table:
        return Table(self, name)

    def pks(self, table: str) -> tuple[str, ...]:
        """The table's primary key columns (rowid when it declares none)."""
        if table not in self._pks:
            cols = sorted((r[5], r[1]) for r in self.conn.execute(f"PRAGMA table_info({_q(table)})") if r[5])
            self._pks[table] = tuple(c for _, c in cols) or ("rowid",)
        return self._pks[table]


class Table:
    def __init__(self, rows: Rows, name: str) -> None:
        self.rows, self.name = rows, name

    def insert(self, row: dict[str, Any]) -> int:
        """Insert one row; its rowid."""
        cols = list(row)
        cur = self.rows.execute(f"INSERT INTO {_q(self.name)} ({', '.join(map(_q, cols))}) "
                                f"VALUES ({', '.join('?' for _ in cols)})", [_value(row[c]) for c in cols])
        return int(cur.lastrowid or 0)

    def insert_all(self, rows: Iterable[dict[str, Any]]) -> None:
        for row in rows:
            self.insert(row)

    def update(self, pk_values: Any, updates: dict[str, Any]) -> None:
        """Change columns of the row with this primary key (a tuple for a compound key); it must exist."""
        pks = self.rows.pks(self.name)
        values = list(pk_values) if isinstance(pk_values, (list, tuple)) else [pk_values]
        if (self._update(pks, values, updates) if updates else int(self._exists(pks, values))) != 1:
            raise LookupError(f"{self.name}: no row with {dict(zip(pks, values))}")

    def upsert(self, row: dict[str, Any], pk: str | Sequence[str]) -> None:
        """Update the row whose `pk` columns match `row`'s (a key or UNIQUE columns), else insert it."""
        keys = (pk,) if isinstance(pk, str) else tuple(pk)
        rest = {k: v for k, v in row.items() if k not in keys}
        if not rest or self._update(keys, [row[k] for k in keys], rest) == 0:
            if rest or not self._exists(keys, [row[k] for k in keys]):
                self.insert(row)

    def _update(self, keys: Sequence[str], values: list[Any], updates: dict[str, Any]) -> int:
        sets = ", ".join(f"{_q(c)} = ?" for c in updates)
        where = " AND ".join(f"{_q(k)} = ?" for k in keys)
        cur = self.rows.execute(f"UPDATE {_q(self.name)} SET {sets} WHERE {where}",
                                [*(_value(v) for v in updates.values()), *values])
        return cur.rowcount

    def _exists(self, keys: Sequence[str], values: list[Any]) -> bool:
        where = " AND ".join(f"{_q(k)} = ?" for k in keys)
        return self.rows.execute(f"SELECT 1 FROM {_q(self.name)} WHERE {where}", values).fetchone() is not None


def _q(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _value(v: Any) -> Any:
    """Lists and dicts are stored as JSON text, as sqlite-utils did."""
    return json.dumps(v) if isinstance(v, (dict, list, tuple)) else v
