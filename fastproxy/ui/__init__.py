"""The status page at /ui/: a small admin view of the whole service (see `page`)."""
