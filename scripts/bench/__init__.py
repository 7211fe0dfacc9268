"""The benchmarks: one CLI (``python -m scripts.bench <subcommand>``), one stack launcher
(:mod:`scripts.bench.stack`, also the tests' ``Stack``) and one module of measurements
(:mod:`scripts.bench.measure`)."""
