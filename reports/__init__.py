"""Report builder: Parquet tables, statistics, terminal report and plots."""
