"""Nearest-neighbour search over embeddings: `SearchIndex` (FAISS + SQLite metadata)."""

from vlfm.search.index import SearchError, SearchIndex

__all__ = ["SearchError", "SearchIndex"]
