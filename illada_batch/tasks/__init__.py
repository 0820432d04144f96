"""The checkable task suite (``suite``) and exact-match evaluation of an engine on it (``evaluate``)."""
