"""Composable async storage: one small interface, one module per backend or decorator.

A config describes a graph of nodes (disk, s3, a cache in front of a remote, shards,
replicas...); `loader.py` builds it from each kind's registered options model, so
the services never know which backends they talk to.
"""
