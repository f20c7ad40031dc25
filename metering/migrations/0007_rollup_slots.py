# Rollup slots (metering.rollups): an hour of (tenant, feature) becomes the sum of up to 100 rows.
#
# Existing rows become slot 0, unchanged: every existing hour reads the same. On PostgreSQL a row past slot 0's
# bound (BASE_UNITS, 10**36 + 98 units: no real history gets there) is split over slots 0, 1, ... with the same sum,
# so that from now on no sum of slots can pass 10**38 - 1 (see rollups.pack). Reversing merges every hour's slots
# back into one row (their sum is within 10**38 - 1 by that same bound).
#
# On PostgreSQL this runs in one transaction; adding the unique constraint builds an index over the table (writes
# to the rollups wait for it: minutes on a table of tens of millions of rows).

from django.db import migrations, models
from django.db.models import Count, Min, Sum

# Frozen copies of metering.rollups' bounds (a migration must not change when the module does).
SLOT_ROWS = 100
POSTGRES_MAX_UNITS = 10**38 - 1
SLOT_UNITS = 10**36 - 1
BASE_UNITS = POSTGRES_MAX_UNITS - (SLOT_ROWS - 1) * SLOT_UNITS


def split_large_rows(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return  # SQLite rows hold at most 2**63 - 1: within slot 0's bound there
    rollup = apps.get_model("xaas_metering", "UsageRollup")
    rows = rollup.objects.using(schema_editor.connection.alias)
    # Raw SQL: the ORM treats the column as a bigint and answers "nothing" to units > 10**36 + 98 without asking.
    with schema_editor.connection.cursor() as cursor:
        table = schema_editor.quote_name(rollup._meta.db_table)
        cursor.execute(f"SELECT id FROM {table} WHERE units > %s::numeric", [str(BASE_UNITS)])
        large = [pk for (pk,) in cursor.fetchall()]
    for row in rows.filter(pk__in=large):
        rest, slot = row.units - BASE_UNITS, 1
        row.units = BASE_UNITS
        row.save(update_fields=["units"])
        while rest > 0:
            part = min(rest, SLOT_UNITS)
            rows.create(tenant_id=row.tenant_id, feature=row.feature, bucket=row.bucket, slot=slot, units=part, events=0)
            rest -= part
            slot += 1


def merge_slots(apps, schema_editor):
    rollup = apps.get_model("xaas_metering", "UsageRollup")
    rows = rollup.objects.using(schema_editor.connection.alias)
    split = (
        rows.values("tenant_id", "feature", "bucket")
        .annotate(n=Count("id"), units_sum=Sum("units"), events_sum=Sum("events"), first=Min("slot"))
        .filter(n__gt=1)
        .order_by()
    )
    for hour in split.iterator():
        same = rows.filter(tenant_id=hour["tenant_id"], feature=hour["feature"], bucket=hour["bucket"])
        same.exclude(slot=hour["first"]).delete()
        same.update(slot=0, units=hour["units_sum"], events=hour["events_sum"])
    rows.exclude(slot=0).update(slot=0)


class Migration(migrations.Migration):
    dependencies = [
        ("xaas_metering", "0006_log_cursor"),
        ("xaas_tenants", "0004_tenantadminscope"),
    ]

    operations = [
        migrations.AddField(
            model_name="usagerollup",
            name="slot",
            field=models.SmallIntegerField(
                db_default=0, default=0, help_text="Which of the hour's rows (their sum is the hour's usage)."
            ),
        ),
        migrations.AddConstraint(
            model_name="usagerollup",
            constraint=models.UniqueConstraint(
                fields=("tenant", "feature", "bucket", "slot"), name="xaas_rollup_unique_slot"
            ),
        ),
        migrations.RemoveConstraint(model_name="usagerollup", name="xaas_rollup_unique_bucket"),
        migrations.AddConstraint(
            model_name="usagerollup",
            constraint=models.CheckConstraint(
                condition=models.Q(("slot__gte", 0), ("slot__lt", 100)), name="xaas_rollup_slot_range"
            ),
        ),
        migrations.AddIndex(
            model_name="usagerollup",
            index=models.Index(condition=models.Q(("slot__gt", 0)), fields=["bucket"], name="xaas_rollup_unfolded"),
        ),
        migrations.RunPython(split_large_rows, merge_slots),
    ]
