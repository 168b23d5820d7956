"""`rosa bench`: op-level and step-level speed / memory benchmarks against PEFT (see docs/bench.md)."""
