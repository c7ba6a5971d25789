"""Create the ``oncely_records`` table in the migrated database (see
:func:`oncely.contrib.django.database.create_table`): exactly the table the store creates,
made by the store's own ``init_schema``."""

from django.db import migrations  # type: ignore[import-untyped]

from oncely.contrib.django.database import create_table, drop_table


class Migration(migrations.Migration):  # type: ignore[misc]
    initial = True
    # The store writes the schema on its own connection; no transaction of Django's may hold
    # the database meanwhile (SQLite would make the two wait for each other).
    atomic = False
    dependencies: list[tuple[str, str]] = []
    operations = [migrations.RunPython(create_table, drop_table, elidable=False)]
