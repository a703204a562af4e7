"""Data for longtrain: token sources, shards, document packing and resumable sampling."""
