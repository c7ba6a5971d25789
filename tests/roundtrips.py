"""Statement tracing over real connections, for tests that count what an operation sends.

:func:`traced` opens a real connection of ``db``'s dialect whose statements are recorded as the
driver sends them, no database mocked:

* SQLite: ``sqlite3.Connection.set_trace_callback`` (every statement SQLite runs, ``BEGIN``,
  ``COMMIT`` and ``SAVEPOINT`` included);
* MariaDB: a PyMySQL ``Connection`` subclass that records each command it sends to the
  server (``COM_QUERY``: every statement, ``BEGIN`` and ``COMMIT`` included): one entry is one
  round trip;
* PostgreSQL: a psycopg ``Cursor`` factory that records each statement run through a cursor
  (psycopg's own implicit ``BEGIN`` and ``conn.commit()`` are not cursor statements and are not
  recorded; a ``COMMIT`` oncely pipelines is).
"""

from __future__ import annotations

from typing import Any

from conftest import POSTGRES_URL
from sql_fixtures import APP, Db


def _text(sql: Any) -> str:
    if isinstance(sql, (bytes, bytearray)):
        return bytes(sql).decode(errors="replace")
    return str(sql if not hasattr(sql, "as_string") else sql.as_string(None))


def traced(db: Db) -> tuple[Any, list[str]]:
    """A new sync connection to ``db`` and the list its statements are appended to (empty
    after connecting)."""
    log: list[str] = []
    if db.dialect == "sqlite":
        conn = db.connect()
        conn.set_trace_callback(log.append)
        return conn, log
    if db.dialect == "mysql":
        import pymysql

        class Traced(pymysql.connections.Connection):  # type: ignore[misc]
            def _execute_command(self, command: int, sql: Any) -> Any:
                log.append(_text(sql))
                return super()._execute_command(command, sql)

        Traced.__module__ = "pymysql.connections"  # adapt() picks the driver by module
        conn = Traced(host="127.0.0.1", port=3306, user="root", database="test")
    else:
        import psycopg

        class TracedCursor(psycopg.Cursor):  # type: ignore[type-arg]
            def execute(self, query: Any, params: Any = None, **kw: Any) -> Any:
                log.append(_text(query))
                return super().execute(query, params, **kw)

        conn = psycopg.connect(POSTGRES_URL, application_name=APP, cursor_factory=TracedCursor)
    db._opened.append(conn)
    log.clear()
    return conn, log


def counts(log: list[str], word: str) -> int:
    """How many statements of ``log`` contain ``word`` (case-insensitive)."""
    return sum(word.lower() in s.lower() for s in log)


class PgWire:
    """Round trips and statements a psycopg connection sends, from libpq's protocol trace
    (``pgconn.trace``): a round trip is each time the server answers after the client sent."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver
        self.trips = 0
        self.queries: list[str] = []

    def __enter__(self) -> PgWire:
        import tempfile

        import psycopg

        self._file = tempfile.TemporaryFile("w+")
        self.driver.pgconn.trace(self._file.fileno())
        self.driver.pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.driver.pgconn.untrace()
        self._file.seek(0)
        last = "B"
        for line in self._file:
            parts = line.rstrip("\n").split("\t")
            if len(parts) < 3:
                continue
            side, kind = parts[0], parts[2].strip()
            if side == "F" and kind in ("Query", "Parse"):
                self.queries.append(parts[-1] if len(parts) > 3 else kind)
            if side == "B" and last == "F":
                self.trips += 1
            last = side
        self._file.close()
