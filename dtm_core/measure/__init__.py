"""What a pair's numbers are: the metrics registry, divergence, streaming, prompt sets and their evaluation, the KLD report, exports."""
