"""The hub's core: events, dispatch, registry, history, flusher. Free of Tornado's web layer."""
