"""Benchmarks: loss kernels, trainer step time and memory vs TRL, generation throughput."""
