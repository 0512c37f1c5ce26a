"""`python -m casbah`: the `casbah` command line without an installed script.

Tests start their servers this way, so they run the checkout's code.
"""

from casbah.cli import main

main()
