"""Default names of code in the ``__main__`` module (redteam4 finding 2): one function has one
name however its process was started, two scripts' functions never share one, and code that
nothing identifies is refused (:mod:`oncely.core.names`)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from oncely.core.names import module_name, qualified_name, type_name
from oncely.errors import ConfigurationError


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))


def _py(
    cwd: Path, *args: str, stdin: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, ONCELY_STORE=f"sqlite:///{cwd / 'oncely.db'}", PYTHONPATH="")
    out = subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env=env,
        input=stdin,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check:
        assert out.returncode == 0, out.stderr
    return out


BILLING = """
    import sys
    from oncely import idempotent

    @idempotent(key=["order_id"])
    def charge(order_id: str) -> str:
        with open("charges.log", "a") as f:
            f.write(f"charged {order_id}\\n")
        return f"charged {order_id}"

    if __name__ == "__main__":
        print(charge(sys.argv[1]))
"""


def test_run_with_m_and_imported_is_one_function(tmp_path: Path) -> None:
    """redteam4 mainname/run.sh: ``python -m billing`` and ``import billing`` ran one charge
    twice (``__main__.charge`` and ``billing.charge``)."""
    _write(
        tmp_path,
        {
            "billing.py": BILLING,
            "web.py": "import sys, billing\nprint(billing.charge(sys.argv[1]))\n",
        },
    )
    _py(tmp_path, "web.py", "order-77")
    _py(tmp_path, "-m", "billing", "order-77")
    _py(tmp_path, "billing.py", "order-77")  # the script by its path: named by its stem
    _py(tmp_path, "web.py", "order-77")
    assert (tmp_path / "charges.log").read_text() == "charged order-77\n"


def test_two_scripts_never_share_a_name(tmp_path: Path) -> None:
    """redteam4 mainname/run2.sh: two scripts' ``process`` shared records (the charge got the
    refund's result and never ran)."""
    tool = """
        import sys
        from oncely import idempotent
        @idempotent(key=["order_id"])
        def process(order_id: str) -> str:
            return "{word} " + order_id
        print(process(sys.argv[1]))
    """
    _write(
        tmp_path,
        {
            "refund_tool.py": tool.replace("{word}", "REFUNDED"),
            "charge_tool.py": tool.replace("{word}", "CHARGED"),
        },
    )
    assert _py(tmp_path, "refund_tool.py", "order-5").stdout == "REFUNDED order-5\n"
    assert _py(tmp_path, "charge_tool.py", "order-5").stdout == "CHARGED order-5\n"


@pytest.mark.parametrize("how", ["-c", "stdin", "package-dir"])
def test_unidentified_main_is_refused(tmp_path: Path, how: str) -> None:
    code = "from oncely import idempotent\n@idempotent(key=['x'])\ndef f(x): return x\n"
    if how == "-c":
        out = _py(tmp_path, "-c", code, check=False)
    elif how == "stdin":
        out = _py(tmp_path, "-", stdin=code, check=False)
    else:  # pkg/tool.py run by path: an import would call it pkg.tool, not tool
        _write(tmp_path, {"pkg/__init__.py": "", "pkg/tool.py": code})
        out = _py(tmp_path, "pkg/tool.py", check=False)
    assert out.returncode != 0
    assert "ConfigurationError" in out.stderr and "name=" in out.stderr, out.stderr


def test_package_main_keeps_its_own_name(tmp_path: Path) -> None:
    """``python -m pkg`` runs ``pkg/__main__.py``: its ``charge`` is ``pkg.__main__.charge`` (the
    name ``import pkg.__main__`` gives), never the ``pkg.charge`` of ``pkg/__init__.py``."""
    _write(
        tmp_path,
        {
            "pkg/__init__.py": """
                from oncely import idempotent
                @idempotent(key=["x"])
                def charge(x: str) -> str:
                    return "init " + x
            """,
            "pkg/__main__.py": """
                from oncely import idempotent
                import pkg
                @idempotent(key=["x"])
                def charge(x: str) -> str:
                    return "main " + x
                print(pkg.charge("a"), "|", charge("a"), "|", charge.idempotency.name)
            """,
        },
    )
    assert _py(tmp_path, "-m", "pkg").stdout == "init a | main a | pkg.__main__.charge\n"


def test_multiprocessing_child_uses_the_parents_name(tmp_path: Path) -> None:
    """A spawn child imports the parent's script as ``__mp_main__``: before, the parent's
    ``__main__.charge`` and the child's ``__mp_main__.charge`` ran one charge twice."""
    _write(
        tmp_path,
        {
            "job.py": BILLING.replace(
                'if __name__ == "__main__":\n        print(charge(sys.argv[1]))',
                'if __name__ == "__main__":\n'
                "        import multiprocessing as mp\n"
                '        print(charge("o-1"))\n'
                '        with mp.get_context("spawn").Pool(1) as pool:\n'
                '            print(pool.apply(charge, ("o-1",)))',
            )
        },
    )
    _py(tmp_path, "job.py")
    assert (tmp_path / "charges.log").read_text() == "charged o-1\n"


def test_sql_decorator_and_key_types_use_the_same_name(tmp_path: Path) -> None:
    """``@idempotent_transaction``'s default key space and a ``__main__`` dataclass inside a
    key are named the same way, run with ``-m`` or imported."""
    _write(
        tmp_path,
        {
            "shop.py": """
                import dataclasses, sqlite3, sys
                import oncely.sql
                from oncely import idempotent

                @dataclasses.dataclass
                class Order:
                    id: str

                @idempotent()
                def ship(order: Order) -> str:
                    with open("effects.log", "a") as f:
                        f.write(f"ship {order.id}\\n")
                    return order.id

                @oncely.sql.idempotent_transaction(key="key", scope=oncely.sql.GLOBAL)
                def pay(conn, key: str) -> str:
                    with open("effects.log", "a") as f:
                        f.write(f"pay {key}\\n")
                    return key

                def main():
                    conn = sqlite3.connect("shop.db")  # not autocommit: oncely refuses that
                    oncely.sql.create_tables(conn)
                    conn.commit()
                    print(ship(Order("o-1")), pay(conn, "k-1"))

                if __name__ == "__main__":
                    main()
            """,
            "app.py": "import shop\nshop.main()\n",
        },
    )
    _py(tmp_path, "-m", "shop")
    _py(tmp_path, "app.py")
    assert (tmp_path / "effects.log").read_text() == "ship o-1\npay k-1\n"


def test_celery_task_in_a_script_gets_the_script_name(tmp_path: Path) -> None:
    pytest.importorskip("celery")
    _write(
        tmp_path,
        {
            "tasks.py": """
                from celery import Celery
                from oncely.messaging.celery import IdempotentTask
                app = Celery(broker="memory://")
                @app.task(base=IdempotentTask, idempotency_store="memory://")
                def process(x):
                    return x
                print(process.name, process._consumer().name)
            """
        },
    )
    assert _py(tmp_path, "tasks.py").stdout == "__main__.process celery:tasks.process\n"
    out = _py(tmp_path, "-", stdin=(tmp_path / "tasks.py").read_text(), check=False)
    assert "ConfigurationError" in out.stderr and "celery task" in out.stderr, out.stderr


def test_names_of_importable_code_are_unchanged() -> None:
    assert module_name("billing.charges") == "billing.charges"
    assert qualified_name(test_names_of_importable_code_are_unchanged) == (
        f"{__name__}.test_names_of_importable_code_are_unchanged"
    )
    assert type_name(ConfigurationError) == "oncely.errors.ConfigurationError"
    with pytest.raises(ConfigurationError, match="lambda"):
        qualified_name(lambda: None)
