"""Where a divergence comes from: one-component sweeps, level curves, explain (lens and patching), attention sinks."""
