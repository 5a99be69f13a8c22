"""Fitting machinery shared by every model: compiled EM and optax gradient fitting."""
