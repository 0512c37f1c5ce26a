"""The Remote Asset index: names (URIs + qualifiers) mapped to CAS content."""
