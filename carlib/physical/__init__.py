"""Physical removal of filters, what a network costs, and layer compression."""
