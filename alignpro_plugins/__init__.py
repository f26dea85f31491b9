"""alignpro-plugins."""
