"""Request records, per-tier summaries, violations, goodput search, plots."""

from .records import request_records, token_times, write_records_csv
from .summary import RunSummary, format_report, summarize, tier_violations

__all__ = ["request_records", "token_times", "write_records_csv", "RunSummary", "format_report", "summarize",
           "tier_violations"]
