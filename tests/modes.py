"""The reasons a test is ``@pytest.mark.commit_mode`` (deselected when ``TEST_WRITE_MODE=log``: tests/conftest.py).

Only tests of commit mode's own mechanism: each reason names the log-mode test of the same guarantee. A test that
states a user-visible guarantee runs in both modes.
"""

FALLBACK = (
    "commit mode's database fallback while Redis is down; log mode answers 503 instead: tests/integration/"
    "test_log_write.py::test_every_enforcement_point_admits_then_answers_503_with_retry_after_when_redis_is_down"
)
WRITE_UNIT = (
    "commit mode's write unit (the fact's own transaction, its statement order, its COMMIT failing); log mode: "
    "tests/metering/test_log_drain_faults.py::test_a_drainer_killed_mid_batch_then_another_drains_each_fact_exactly_once"
)
ROLLUP_SLOTS = (
    "commit mode's per-fact rollup slots; log mode aggregates rollups per batch: "
    "tests/metering/test_log_drain.py::test_drained_facts_are_rolled_up_at_every_level_and_leave_the_stream"
)
QUERY_COUNT = (
    "commit mode's statements per fact; log mode: "
    "tests/integration/test_log_write.py::test_a_warm_admitted_request_is_one_redis_round_trip_and_no_sql"
)
FLUSH = (
    "commit mode loses nothing to a Redis flush (the database holds every fact); log mode's durability is Redis's: "
    "tests/integration/test_log_write.py::"
    "test_redis_flushed_with_undrained_entries_notes_the_gap_and_persists_no_more_than_the_limit"
)
REBUILD = (
    "commit mode's rebuild waiting for a writer's open transaction; log mode: "
    "tests/integration/test_log_write.py::test_counters_lost_mid_run_are_rebuilt_from_database_and_stream"
)
ROLLUP_RANGE = (
    "commit mode refuses a fact past the hour's rollup range by name at write time; log mode admits it (Redis's "
    "counters are bignums) and the drainer keeps it dead and gives it back: "
    "tests/metering/test_log_attack.py::test_an_hour_past_the_rollup_range_does_not_block_the_drain_of_other_trees"
)
FEATURE_BOUND = (
    "commit mode's MAX_FEATURES_PER_TREE is exact between concurrent writers; log mode's is approximate while the "
    "drain lags (documented in metering.appender.admit_feature: it bounds abuse, it counts no money) and costs a "
    "query only for a feature this process has not seen: "
    "tests/integration/test_log_write.py::test_a_warm_admitted_request_is_one_redis_round_trip_and_no_sql"
)
