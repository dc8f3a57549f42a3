"""Field trials on one host: network namespaces per device, shaped links (docs/trials.md)."""
