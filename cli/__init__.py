"""The `decouple` command line: a thin click layer over the `decouple` library."""
