"""Titans: a neural long-term memory learned at test time (arXiv 2501.00663). Not registered yet: the memory
module is built, the MAC / MAG / MAL model follows (issue 11)."""
