"""What runs many runs: comparisons, stress tests, t-SNE views of saved embeddings, reports."""
