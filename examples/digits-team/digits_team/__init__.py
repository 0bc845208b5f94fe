"""A team's own federation (scikit-learn's digits, their own models) running DDOME."""
