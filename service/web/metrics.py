"""GET /metrics: one instance's figures in Prometheus' text format.

Rendered from `Gateway.stats()` (memory only, never a query) and the listeners'
refusal counts, so a scrape answers at once while the database is down.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

__all__ = ["render"]


def render(stats: dict[str, Any], rejections: Counter[tuple[str, int, str]]) -> str:
    spool = stats["spool"]
    hist = stats["inbox_write_seconds"]
    lines = [
        "# TYPE pgleader_is_leader gauge",
        f"pgleader_is_leader {int(stats['is_leader'])}",
        "# TYPE pgleader_epoch gauge",
        f"pgleader_epoch {stats['epoch'] or 0}",
        "# TYPE pgleader_heartbeats_total counter",
        f'pgleader_heartbeats_total{{result="ok"}} {stats["heartbeats_ok"]}',
        f'pgleader_heartbeats_total{{result="failed"}} {stats["heartbeats_failed"]}',
        "# TYPE pgleader_leadership_changes_total counter",
        f"pgleader_leadership_changes_total {stats['leadership_changes']}",
        # The outage spool: what waits for the database, and what it could not take.
        "# TYPE gateway_spooled_signals gauge",
        f"gateway_spooled_signals {spool['records']}",
        "# TYPE gateway_spool_bytes gauge",
        f"gateway_spool_bytes {spool['bytes']}",
        "# TYPE gateway_spool_max_bytes gauge",
        f"gateway_spool_max_bytes {spool['max_bytes']}",
        "# TYPE gateway_spool_refused_total counter",
        f"gateway_spool_refused_total {spool['refused']}",
        "# TYPE gateway_spool_quarantined_total counter",
        f"gateway_spool_quarantined_total {spool['quarantined']}",
        # Requests refused (4xx, 503 busy) by listener, code and reason: an attack shows here.
        "# TYPE gateway_http_rejections_total counter",
        *(
            f'gateway_http_rejections_total{{listener="{listener}",code="{code}",'
            f'reason="{reason}"}} {n}'
            for (listener, code, reason), n in sorted(rejections.items())
        ),
        "# TYPE gateway_webhook_answers_total counter",
        *(
            f'gateway_webhook_answers_total{{status="{k}"}} {v}'
            for k, v in sorted(stats["answers"].items())
        ),
        "# TYPE gateway_executions_total counter",
        *(
            f'gateway_executions_total{{result="{k}"}} {v}'
            for k, v in sorted(stats["executions"].items())
        ),
        # Batches and writes with the signals in them: their ratio is the mean size.
        "# TYPE gateway_execution_batches_total counter",
        f"gateway_execution_batches_total {stats['execution_batches']['batches']}",
        "# TYPE gateway_execution_batch_signals_total counter",
        f"gateway_execution_batch_signals_total {stats['execution_batches']['signals']}",
        "# TYPE gateway_inbox_writes_total counter",
        f"gateway_inbox_writes_total {stats['inbox_writes']['writes']}",
        "# TYPE gateway_inbox_write_signals_total counter",
        f"gateway_inbox_write_signals_total {stats['inbox_writes']['signals']}",
        # Time to commit a write: mostly the disk's WAL flush, which every answer waits for.
        "# TYPE gateway_inbox_write_seconds histogram",
        *(
            f'gateway_inbox_write_seconds_bucket{{le="{_le(bound)}"}} {n}'
            for bound, n in hist.cumulative()
        ),
        f"gateway_inbox_write_seconds_sum {hist.sum:.6f}",
        f"gateway_inbox_write_seconds_count {hist.count}",
        # The kill switch as last read (1 on the mode it is in), and the last
        # reconciliation this instance ran (1 on its outcome; none yet: no sample).
        "# TYPE gateway_trading_halt gauge",
        *(
            f'gateway_trading_halt{{mode="{mode}"}} {int(stats["trading_halt"] == mode)}'
            for mode in ("running", "halted", "entries_only")
            if stats["trading_halt"] is not None
        ),
        "# TYPE gateway_last_reconciliation gauge",
        *(
            f'gateway_last_reconciliation{{outcome="{outcome}"}}'
            f" {int(stats['last_reconciliation'] == outcome)}"
            for outcome in ("matched", "mismatch", "failed")
            if stats["last_reconciliation"] is not None
        ),
        # The leader's jobs: runs by this instance, and how long since each last
        # succeeded (by the database's record, whoever ran it; no sample: never).
        "# TYPE pgleader_job_runs_total counter",
        *(
            f'pgleader_job_runs_total{{job="{job}",outcome="{outcome}"}} {n}'
            for job, figures in sorted(stats["jobs"].items())
            for outcome, n in sorted(figures["runs"].items())
        ),
        "# TYPE pgleader_job_last_duration_seconds gauge",
        *(
            f'pgleader_job_last_duration_seconds{{job="{job}"}} {figures["last_duration"]:.6f}'
            for job, figures in sorted(stats["jobs"].items())
            if figures["last_duration"] is not None
        ),
        "# TYPE pgleader_job_seconds_since_success gauge",
        *(
            f'pgleader_job_seconds_since_success{{job="{job}"}} {figures["since_success"]:.3f}'
            for job, figures in sorted(stats["jobs"].items())
            if figures["since_success"] is not None
        ),
    ]
    return "\n".join(lines) + "\n"


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else f"{bound:g}"
