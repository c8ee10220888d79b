"""Evaluation: O-KNN, disturbed O-KNN, coupling rate, positional bias, weight export."""
