"""The one place casbah speaks REAPI as a client.

- `channel`: remote specs (URL, instance, TLS, token) and channels;
- `retry`: the retry policy and the mapping of transport failures;
- `connection`: one asyncio connection to an upstream (stubs, metadata, capabilities);
- `plan`: pure planning (FindMissingBlobs groups, batch packing, resource names);
- `cas`: the CAS client (plus Remote Asset and ReferenceStorage calls) every user goes through;
- `bytestream`, `names`, `wire`: the parts of the CAS client (streams, naming calls, batch encoding).

The CLI and the local cache use it through a synchronous facade, `casbah.client.remote`.

Nothing here imports `casbah.storage` or `casbah.client`: both import this.
"""
