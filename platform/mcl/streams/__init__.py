"""Streams: ordered lists of tasks with train/test samples in one schema."""

from mcl.streams.registry import Stream, TaskData, available_streams, build_stream, register_stream
from mcl.streams.samples import Sample

__all__ = ["Sample", "Stream", "TaskData", "available_streams", "build_stream", "register_stream"]
