"""ServerMetrics.of_exit: one exit's labelled series, looked up once, recording into the registry."""

from __future__ import annotations

from server.metrics import ServerMetrics


def test_of_exit_hands_out_the_same_series_and_they_record_under_the_exit_label():
    m = ServerMetrics()
    series = m.of_exit("22")
    assert m.of_exit("22") is series and m.of_exit("full") is not series
    series.itl.observe(0.02)
    series.itl.observe(0.03)
    series.generation_tokens.inc(5)
    text = m.render().decode()
    assert 'balcony:inter_token_latency_seconds_count{exit="22"} 2.0' in text
    assert 'balcony:generation_tokens_total{exit="22"} 5.0' in text
    assert 'balcony:inter_token_latency_seconds_count{exit="full"} 0.0' in text  # looked up, nothing observed
