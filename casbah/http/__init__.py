"""The HTTP cache front: Bazel's HTTP protocol, ccache and sccache (WebDAV) on casbah's storage."""
