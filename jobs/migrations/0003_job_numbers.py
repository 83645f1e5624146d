"""Job.numbers: the numbers a job's fields state, for filters (docs/filters.md).

Jobs stored before it get theirs here, so that a replay or a claim filters old
and new jobs alike.
"""

from typing import Any

from django.db import migrations, models

BATCH = 500


def fill_numbers(apps: Any, schema_editor: Any) -> None:
    from jobs.numbers import numbers_from_fields

    Job = apps.get_model("jobs", "Job")
    batch = []
    for job in Job.objects.only("id", "fields").iterator(chunk_size=BATCH):
        fields = job.fields if isinstance(job.fields, dict) else {}
        texts = {name: text for name, text in fields.items() if isinstance(text, str)}
        job.numbers = numbers_from_fields(texts)
        if job.numbers:
            batch.append(job)
        if len(batch) >= BATCH:
            Job.objects.bulk_update(batch, ["numbers"])
            batch = []
    if batch:
        Job.objects.bulk_update(batch, ["numbers"])


class Migration(migrations.Migration):
    dependencies = [
        ("jobs", "0002_job_delivered_at"),
    ]

    operations = [
        migrations.AddField(
            model_name="job",
            name="numbers",
            field=models.JSONField(blank=True, default=dict, editable=False),
        ),
        migrations.RunPython(fill_numbers, migrations.RunPython.noop),
    ]
