"""SingleUse: v2 nonces and WebSocket tickets, kept for their whole lifetime.

On SQLite the table is WITHOUT ROWID: one b-tree keyed by the value's key
rather than a table and an index beside it, so the write every v2 request
makes touches one b-tree, not two (docs/security.md, "Nonces"). Django's
SQLite schema editor would rebuild it as an ordinary table on a later
AlterField; write such a change the same way.
"""

from typing import Any

from django.db import migrations, models

SQLITE_TABLE = """
CREATE TABLE "jobs_singleuse" (
    "key" varchar(160) NOT NULL PRIMARY KEY,
    "value" varchar(64) NOT NULL,
    "expires_at" real NOT NULL
) WITHOUT ROWID
"""


def create_table(apps: Any, schema_editor: Any) -> None:
    if schema_editor.connection.vendor == "sqlite":
        schema_editor.execute(SQLITE_TABLE)
    else:
        schema_editor.create_model(apps.get_model("jobs", "SingleUse"))


def drop_table(apps: Any, schema_editor: Any) -> None:
    schema_editor.delete_model(apps.get_model("jobs", "SingleUse"))


class Migration(migrations.Migration):
    dependencies = [
        ("jobs", "0003_job_numbers"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            state_operations=[
                migrations.CreateModel(
                    name="SingleUse",
                    fields=[
                        (
                            "key",
                            models.CharField(
                                max_length=160, primary_key=True, serialize=False
                            ),
                        ),
                        ("value", models.CharField(max_length=64)),
                        ("expires_at", models.FloatField()),
                    ],
                ),
            ],
        ),
        # After the state has the model, so that create_model can read it.
        migrations.RunPython(create_table, drop_table),
    ]
