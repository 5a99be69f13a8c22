"""Discrete hidden Markov models: the forward-backward recursions, emission families, priors and EM."""
