"""casbah: a REAPI remote-cache server (CAS, ActionCache, Remote Asset)."""

__version__ = "0.1.0"
