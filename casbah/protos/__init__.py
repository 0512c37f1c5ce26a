"""Generated protobuf and gRPC modules (REAPI, Remote Asset, ByteStream, BuildStream).

Everything below this package except this file is produced by ``scripts/genprotos``
from the sources in ``proto/``. Do not edit the generated modules by hand; change
the ``.proto`` files and re-run the generator instead.
"""
