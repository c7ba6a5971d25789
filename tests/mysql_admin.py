"""Look at the MySQL/MariaDB test database from outside the store: a plain autocommit PyMySQL
connection to it, a query, whether a table exists. Shared by the MySQL store tests."""

from __future__ import annotations

from typing import Any

from conftest import MYSQL_URL


def admin() -> Any:
    """A plain autocommit PyMySQL connection to the test database (not through the store)."""
    import pymysql

    from oncely.stores.mysql import MySQLStore

    store = MySQLStore(MYSQL_URL)
    args = {k: v for k, v in store._sync_args.items() if k not in ("client_flag", "init_command")}
    return pymysql.connect(**args)


def sql(query: str, *args: Any) -> list[tuple[Any, ...]]:
    """The rows ``query`` (``%s`` placeholders for ``args``) returns, on its own connection."""
    conn = admin()
    try:
        with conn.cursor() as cur:
            cur.execute(query, args or None)
            return list(cur.fetchall())
    finally:
        conn.close()


def table_exists(table: str) -> bool:
    rows = sql(
        "SELECT COUNT(*) FROM information_schema.tables "
        "WHERE table_schema = DATABASE() AND table_name = %s",
        table,
    )
    return bool(rows[0][0])
