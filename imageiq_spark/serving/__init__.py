"""Answers about one image: the HTTP server, its limits, similar images."""
