"""`recs bench trending`: both sides re-sum the same window; the consumer's copy reads every bucket once,
then only the one counted since, and keeps what the union keeps."""

from __future__ import annotations

from bench.trending import WINDOW, bench_trending


def test_the_copy_reads_only_the_newest_bucket_after_its_first_re_sum_and_keeps_the_union_s_list() -> None:
    result = bench_trending(items=(40,), passes=3)["items"]["40"]
    assert result["identical"]
    assert result["copy"]["first"]["buckets_read"] == WINDOW
    assert result["copy"]["steady_median"]["buckets_read"] == 1
    assert result["union"]["steady_median"]["buckets_read"] == WINDOW
