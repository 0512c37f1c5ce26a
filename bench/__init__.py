"""casbah's benchmark suite: the same REAPI scenarios against casbah and its peers.

Run it with `scripts/bench` (bootstraps everything) or `python -m bench`; see README.md.
"""
