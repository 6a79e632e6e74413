"""The pure core: domain types and rules. No I/O, no clock, no network libraries."""
