"""Warehouse: DuckDB views over the lake for analysts, a report, and the analyst CLI."""
