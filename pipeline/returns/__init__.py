"""Returns: collect the return path, parse and classify bounces, reconcile, cases."""
