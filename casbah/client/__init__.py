"""The client side of casbah's command line: a local CAS cache, checkouts, push/pull and source caching.

Synchronous, because the CLI is: it talks to servers through `client/remote.py`, a
facade over the async REAPI client in `casbah/reapi/`, and never imports `storage/`.
"""
