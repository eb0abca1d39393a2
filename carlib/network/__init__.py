"""The network as units: fx analysis of prunable filters, dependency groups, masks (MaskedNet)."""
