"""Job.pushed_at: when a WebSocket client first had the job.

Jobs delivered before it get theirs from ``delivered_at`` where only a push can
have set it: no claim, or a delivery before the claim. (A job the admin requeued after a
claim looks the same as a pushed one then, and is counted as pushed.)
"""

from typing import Any

from django.db import migrations, models
from django.db.models import F, Q


def fill_pushed_at(apps: Any, schema_editor: Any) -> None:
    Job = apps.get_model("jobs", "Job")
    Job.objects.filter(delivered_at__isnull=False).filter(
        Q(claimed_at__isnull=True) | Q(delivered_at__lt=F("claimed_at"))
    ).update(pushed_at=F("delivered_at"))


class Migration(migrations.Migration):
    dependencies = [
        ("jobs", "0004_single_use"),
    ]

    operations = [
        migrations.AddField(
            model_name="job",
            name="pushed_at",
            field=models.DateTimeField(blank=True, editable=False, null=True),
        ),
        migrations.RunPython(fill_pushed_at, migrations.RunPython.noop),
    ]
