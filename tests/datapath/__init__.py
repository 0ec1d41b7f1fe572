"""Data-path tests: the compiled burst and its pure-Python reference on the same rings."""
