"""What to compress: plans, the choice table and its solvers, mixed plans under a budget, exports to other tools."""
