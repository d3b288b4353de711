"""`make bench`: Ferry's figures measured side by side with their physical references.

Run `python -m bench` (what `make bench` runs). Every figure is measured in the same run as its
reference, on the same machine, against the same PostgreSQL database and the same S3 endpoint (a
moto server the bench starts on loopback), alternating the order of the two sides, and reported as
the median of `BENCH_REPEAT` runs. The table goes to stdout and to `bench/results/latest.md`.

Environment:
- `BENCH_ROWS` (default 1,000,000; 10,000,000 with `BENCH_BIG=1`): rows of the exported table.
- `BENCH_BIG=1`: the 10M-row table, and the worker's peak RSS at 10M rows besides 1M.
- `BENCH_REPEAT` (default 3): runs per side; medians are reported.
- `BENCH_DATABASE_URL` (default postgresql://postgres@127.0.0.1:5432/ferry_bench): created and
  migrated on demand; the seeded rows are kept between runs.
- `BENCH_REDIS_URL` (default redis://127.0.0.1:6379/10): flushed at start and end.
- `BENCH_ONLY`: comma-separated subset of export,import,memory,api,ws.
- `BENCH_PROFILE=1`: also record py-spy flame graphs of the worker during one export and of the
  API during submissions.
- `BENCH_API_CLIENTS` (64), `BENCH_API_SECONDS` (8), `BENCH_API_RATE` (1000): the API load:
  clients (each its own tenant, key and connection), seconds per run, and the offered rate of
  the open-loop runs whose latency is reported.
"""
