"""From records to clusters: the data, warm-up, gradient-pass and cluster stages, and the k-means they end in."""
