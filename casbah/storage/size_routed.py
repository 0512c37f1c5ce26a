"""`size-routed`: small blobs to one backend, large ones to another (by digest size).

Bulk calls are split by size and both halves run concurrently (`PartitionedStorage`)."""

from __future__ import annotations

from pydantic import Field

from casbah.config import parse_size
from casbah.digest import Digest
from casbah.storage.base import Storage
from casbah.storage.loader import NodeOptions, StorageLoader, register
from casbah.storage.partitioned import PartitionedStorage


class SizeRoutedStorage(PartitionedStorage):
    kind = "size-routed"

    def __init__(self, small: Storage, large: Storage, threshold: int, **kwargs) -> None:
        super().__init__((small, large), **kwargs)
        self.small = small
        self.large = large
        self.threshold = threshold

    def part_index(self, digest: Digest) -> int:
        return 0 if digest.size <= self.threshold else 1


class SizeRoutedOptions(NodeOptions):
    small: str | dict
    large: str | dict
    threshold: int | str = Field(default="64K", description="largest size (bytes) routed to `small`")


@register("size-routed", SizeRoutedOptions)
def _build(options: SizeRoutedOptions, loader: StorageLoader, path: str) -> SizeRoutedStorage:
    return SizeRoutedStorage(
        loader.build(options.small, f"{path}.small"), loader.build(options.large, f"{path}.large"),
        parse_size(options.threshold), name=path,
    )
