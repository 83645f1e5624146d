from __future__ import annotations

from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True

    dependencies = []

    operations = [
        migrations.CreateModel(
            name="PollerStatus",
            fields=[
                (
                    "id",
                    models.BigAutoField(
                        auto_created=True,
                        primary_key=True,
                        serialize=False,
                        verbose_name="ID",
                    ),
                ),
                ("started_at", models.DateTimeField()),
                ("updated_at", models.DateTimeField()),
                ("report", models.JSONField(default=dict)),
            ],
            options={
                "verbose_name": "poller status",
                "verbose_name_plural": "poller status",
            },
        ),
    ]
