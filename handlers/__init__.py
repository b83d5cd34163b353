"""The HTTP surface of the hub: thin Tornado handlers over the core in `hub`."""
