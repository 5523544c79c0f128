"""Board tops and build scripts."""
