"""Serving: the front end, its pure stages (grouper, encoder, decoder) and the workers."""
