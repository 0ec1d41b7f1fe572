"""Virtqueues over guest memory: the split ring layout of virtio 1.2, section 2.7."""

from .split import DescriptorChain, SplitQueue, VirtqueueError

__all__ = ["DescriptorChain", "SplitQueue", "VirtqueueError"]
