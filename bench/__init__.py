"""Remit's benchmark: `./run.sh bench [--quick]` (the method is in bench/README.md)."""
