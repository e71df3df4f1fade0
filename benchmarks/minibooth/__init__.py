"""MiniBooth: the GSOFT paper's subject-driven comparison at CPU scale (docs/minibooth.md)."""
