"""The gRPC server: one module per REAPI/Remote Asset/BuildStream service, plus what they share.

Every service resolves a request's instance through `Instances` (base.py), maps
casbah's errors through the one status table, and reads and writes only through
the storage graph the config built; the app wires them with auth, limits and metrics.
"""
