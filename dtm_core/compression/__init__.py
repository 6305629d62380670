"""What makes the compressed side: the methods registry, recipes, calibration statistics, expert overrides, pairs, IntactKV."""
